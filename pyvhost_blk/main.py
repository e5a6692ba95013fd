"""``pyvhost-blk``: entry point."""

from __future__ import annotations

import sys

from pyvhost_blk import __version__
from pyvhost_blk.cli import USAGE, UsageError, parse_args
from pyvhost_blk.logs import log_level, setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cl = parse_args(argv)
        if cl.help:
            sys.stdout.write(USAGE)
            return 0
        if cl.version:
            print(f"pyvhost-blk {__version__}")
            return 0
        try:
            setup_logging(cl.log_format, log_level())
        except ValueError as e:
            raise UsageError(str(e)) from None
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
