"""``pyvhost-blk``: entry point."""

from __future__ import annotations

import logging
import os
import sys

from pyvhost_blk import __version__
from pyvhost_blk.cli import USAGE, UsageError, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=os.environ.get("PYVHOST_BLK_LOG", "INFO").upper(),
        format="pyvhost-blk: %(message)s",
    )
    try:
        cl = parse_args(argv)
        if cl.help:
            sys.stdout.write(USAGE)
            return 0
        if cl.version:
            print(f"pyvhost-blk {__version__}")
            return 0
        from pyvhost_blk.daemon import Daemon  # imports the C extension

        daemon = Daemon()
        try:
            daemon.configure(cl)
        except UsageError:
            daemon.abort()
            raise
    except UsageError as e:
        print(f"pyvhost-blk: {e}", file=sys.stderr)
        return 1
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
