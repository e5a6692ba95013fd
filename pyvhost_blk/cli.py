"""qemu-storage-daemon's command line, parsed in order.

``pyvhost-blk [--blockdev OPTS]... [--export OPTS]... [--object OPTS]... [--chardev OPTS]...
[--monitor OPTS]... [--pidfile PATH] [--stats-file PATH] [--log-format text|json]``; each option
may be written ``--opt VALUE`` or ``--opt=VALUE``; VALUE is QEMU keyval syntax or JSON (``{...}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvhost_blk.keyval import ParsedOption, parse_option
from pyvhost_blk.logs import DEFAULT_LOG_FORMAT, LOG_FORMATS

USAGE = """\
Usage: pyvhost-blk [options]
A virtio-blk vhost-user backend (qemu-storage-daemon compatible command line).

  -h, --help                display this help and exit
  -V, --version             output version information and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off][,cache.direct=on|off]
             [,<driver options>]
                            a block node: driver=file (filename=, aio=threads|io_uring)
                            or driver=null-co (size=, read-zeroes=)
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
           [,iothread=<id> | iothread.0=<id>,iothread.1=<id>...][,writethrough=on|off]
  --export [type=]vhost-user-blk,...,addr.type=fd,addr.str=<fd>
                            export a node over an inherited listening socket
  --object iothread,id=<id>[,poll-max-ns=<ns>]
                            an I/O thread (one event loop) for export queues
  --object x-prometheus,id=<id>,port=<port>[,addr=<address>]
                            serve Prometheus metrics on http://<address>:<port>/metrics
                            (default address 127.0.0.1; port=0 picks a free port, logged)
                            (pyvhost-blk extension)
  --pidfile <path>          write the process ID to a file after startup
  --stats-file <path>       write per-export/queue/iothread counters as JSON at exit
                            and on SIGUSR1 (pyvhost-blk extension)
  --log-format text|json    log lines as 'pyvhost-blk: <message>' (text, the default) or
                            as one JSON object per line (pyvhost-blk extension)

Send SIGTERM or SIGINT to finish in-flight requests, remove the sockets and exit.
"""

# option -> implied key (as qemu-storage-daemon)
_IMPLIED = {
    "blockdev": "driver",
    "export": "type",
    "object": "qom-type",
    "chardev": "backend",
    "monitor": "chardev",
}
_PLAIN = ("pidfile", "stats-file", "log-format")


class UsageError(Exception):
    """A command-line error: print ``pyvhost-blk: <message>`` and exit 1."""


@dataclass
class CommandLine:
    items: list[tuple[str, str, ParsedOption]] = field(default_factory=list)  # (opt, text, parsed)
    pidfile: str | None = None
    stats_file: str | None = None
    log_format: str = DEFAULT_LOG_FORMAT
    help: bool = False
    version: bool = False

    def of(self, opt: str) -> list[tuple[str, ParsedOption]]:
        return [(text, p) for o, text, p in self.items if o == opt]


def parse_args(argv: list[str]) -> CommandLine:
    """Parse argv (without the program name).  Raises UsageError, or KeyvalError wrapped
    in UsageError with the option text as context."""
    cl = CommandLine()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            cl.help = True
            continue
        if arg in ("-V", "--version"):
            cl.version = True
            continue
        if not arg.startswith("--"):
            raise UsageError(f"Unexpected argument: {arg}")
        name, eq, value = arg[2:].partition("=")
        if name not in _IMPLIED and name not in _PLAIN:
            raise UsageError(f"unrecognized option '{arg}'")
        if not eq:
            if i >= len(argv):
                raise UsageError(f"option '--{name}' requires an argument")
            value = argv[i]
            i += 1
        if name == "pidfile":
            cl.pidfile = value
        elif name == "stats-file":
            cl.stats_file = value
        elif name == "log-format":
            if value not in LOG_FORMATS:
                raise UsageError(f"--log-format {value}: invalid log format "
                                 f"(expected {' or '.join(repr(f) for f in LOG_FORMATS)})")
            cl.log_format = value
        else:
            try:
                parsed = parse_option(value, _IMPLIED[name])
            except ValueError as e:
                raise UsageError(f"--{name} {value}: {e}") from None
            cl.items.append((name, value, parsed))
    return cl
