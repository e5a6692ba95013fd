"""``--chardev`` and ``--monitor``: option parsing and the monitors' listening sockets.

Theory of operation
-------------------
qemu-storage-daemon parses ``--chardev`` with QemuOpts (so the key list is the chardev one and
the errors say ``Invalid parameter 'x'``) and ``--monitor`` as QAPI ``MonitorOptions`` (keyval
or JSON, errors ``Parameter 'x' is unexpected``).  ``pyvhost_blk/cli.py`` has already split both
into :class:`ParsedOption` trees (implied keys ``backend`` and ``chardev``); this module checks
them and builds the monitors.  Everything runs in the main thread, in ``Daemon.configure``,
before the main loop starts.

Supported: ``--chardev socket,id=ID,path=PATH,server=on[,wait=on|off]`` (a UNIX socket; a stale
socket file is replaced, a live one is refused, see ``vhost.server.listen_unix``) and
``--chardev socket,id=ID,fd=N,server=on`` (an inherited socket; listened on if it is not yet);
``--monitor [chardev=]ID[,mode=control][,pretty=on|off][,id=X]``.  ``wait=on`` (QEMU's default
for a server socket) blocks here until the first client connects, with QEMU's ``info: QEMU
waiting for connection on: ...`` line on stderr; that client then gets the monitor's greeting.
Other backends, client mode (``server=off``), TCP/telnet/websocket/TLS are refused with one
line.  Differences from qsd: the deprecated short booleans (``server,nowait``) are rejected by
the keyval parser; all ``--chardev`` options are handled before all ``--monitor`` options,
whatever their order; a chardev no monitor uses is checked but not opened.

Errors are :class:`MonitorOptionError` (a ``KeyvalError``): ``str(e)`` is the message,
``e.option``/``e.text`` say which option, so the daemon prints ``--chardev TEXT: message``.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pyvhost_blk.keyval import KeyvalError, ParsedOption, to_bool, to_int, to_str
from pyvhost_blk.qmp import Monitor, QmpDispatcher
from vhost.server import SocketInUse, SocketPathError, listen_unix

__all__ = [
    "ChardevSpec",
    "MonitorOptionError",
    "MonitorSpec",
    "create_monitors",
    "parse_chardev",
    "parse_monitor",
]

# QEMU 7.2's chardev QemuOpts keys (`--chardev socket,id=x,help`)
_QEMU_CHARDEV_KEYS = frozenset((
    "abstract", "append", "backend", "chardev", "clipboard", "cols", "debug", "delay", "fd",
    "height", "host", "ipv4", "ipv6", "localaddr", "localport", "logappend", "logfile", "mouse",
    "mux", "name", "nodelay", "path", "port", "reconnect", "rows", "server", "signal", "size",
    "telnet", "tight", "tls-authz", "tls-creds", "tn3270", "to", "wait", "websocket", "width",
    "id",
))
_QEMU_BACKENDS = (
    "pty", "udp", "memory", "file", "socket", "stdio", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial",
)
# boolean keys that are harmless when off (or, for nodelay, meaningless for UNIX sockets)
_IGNORED_IF_OFF = ("telnet", "tn3270", "websocket", "mux", "abstract", "logappend", "nodelay")
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class MonitorOptionError(KeyvalError):
    """A bad ``--chardev``/``--monitor``; ``option`` is ``"chardev"`` or ``"monitor"``."""

    def __init__(self, option: str, text: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.text = text


@dataclass
class ChardevSpec:
    id: str
    backend: str
    path: str | None = None
    fd: int | None = None
    server: bool = False
    wait: bool = True
    text: str = ""


@dataclass
class MonitorSpec:
    chardev: str
    pretty: bool = False
    id: str | None = None
    mode: str = "control"
    text: str = ""


def parse_chardev(text: str, p: ParsedOption) -> ChardevSpec:
    """Check one ``--chardev``; raises KeyvalError with qsd's message where qsd has one."""
    if p.from_json:
        raise KeyvalError(
            "--chardev takes key=value options only (qemu-storage-daemon parses it with "
            "QemuOpts, not as JSON)"
        )
    v = p.values
    for key, val in v.items():
        if key not in _QEMU_CHARDEV_KEYS or isinstance(val, dict | list):
            raise KeyvalError(f"Invalid parameter '{key}'")
    if "id" in v and not _IDENT.match(to_str(v["id"], "id")):
        raise KeyvalError("Parameter 'id' expects an identifier")
    if "id" not in v:
        raise KeyvalError("chardev: no id specified")
    cid = to_str(v["id"], "id")
    if "backend" not in v:
        raise KeyvalError(f'chardev: "{cid}" missing backend')
    backend = to_str(v["backend"], "backend")
    if backend not in _QEMU_BACKENDS:
        raise KeyvalError(f"'{backend}' is not a valid char driver name")
    if backend != "socket":
        raise KeyvalError(
            f"chardev backend '{backend}' is not supported by pyvhost-blk (use 'socket')"
        )
    spec = ChardevSpec(cid, backend, text=text)
    addrs = [k for k in ("path", "fd", "host") if k in v]
    if len(addrs) > 1:
        raise KeyvalError("None or one of 'path', 'fd' or 'host' option required.")
    spec.server = to_bool(v["server"], "server") if "server" in v else False
    if "wait" in v:
        spec.wait = to_bool(v["wait"], "wait")
        if not spec.server:
            raise KeyvalError("'wait' option is incompatible with socket in client connect mode")
    if "reconnect" in v and spec.server:
        raise KeyvalError("'reconnect' option is incompatible with socket in server listen mode")
    if not addrs:
        raise KeyvalError("chardev: socket: no path given (pyvhost-blk needs path= or fd=)")
    if addrs[0] == "host":
        raise KeyvalError("TCP sockets (host=, port=) are not supported by pyvhost-blk; "
                          "use path=")
    for key in v:
        if key in ("id", "backend", "path", "fd", "server", "wait", "reconnect", "tight"):
            continue
        if key in _IGNORED_IF_OFF and not to_bool(v[key], key):
            continue
        raise KeyvalError(f"chardev option '{key}' is not supported by pyvhost-blk")
    if not spec.server:
        raise KeyvalError(
            "client mode (server=off) is not supported by pyvhost-blk: use server=on"
        )
    if "path" in v:
        spec.path = to_str(v["path"], "path")
        if not spec.path:
            raise KeyvalError("chardev: socket: empty path")
    else:
        fd = to_str(v["fd"], "fd")
        if not fd.isdigit():
            raise KeyvalError(f"File descriptor '{fd}' is not a number (named fds need the "
                              "monitor's getfd, which pyvhost-blk does not have)")
        spec.fd = to_int(fd, "fd", "int32")
    return spec


def parse_monitor(text: str, p: ParsedOption) -> MonitorSpec:
    """Check one ``--monitor`` (keyval or JSON), with qsd's messages.  ``mode=readline`` is
    refused later (``Only QMP is supported``), after the chardev lookup, as in qsd."""
    v, j = p.values, p.from_json
    if "chardev" not in v:
        raise KeyvalError("Parameter 'chardev' is missing")
    spec = MonitorSpec(to_str(v["chardev"], "chardev", from_json=j), text=text)
    if "id" in v:
        spec.id = to_str(v["id"], "id", from_json=j)
    if "mode" in v:
        spec.mode = to_str(v["mode"], "mode", from_json=j)
        if spec.mode not in ("control", "readline"):
            raise KeyvalError(f"Parameter 'mode' does not accept value '{spec.mode}'")
    if "pretty" in v:
        spec.pretty = to_bool(v["pretty"], "pretty", from_json=j)
    for key in v:
        if key not in ("chardev", "id", "mode", "pretty"):
            raise KeyvalError(f"Parameter '{key}' is unexpected")
    return spec


def _open_listener(spec: ChardevSpec) -> socket.socket:
    """The chardev's listening socket.  Raises KeyvalError."""
    if spec.path is not None:
        try:
            return listen_unix(spec.path)
        except (SocketInUse, SocketPathError) as e:
            raise KeyvalError(str(e)) from None
        except OSError as e:
            raise KeyvalError(
                f"Failed to bind socket to {spec.path}: {e.strerror or e}"
            ) from None
    assert spec.fd is not None
    try:
        if not stat.S_ISSOCK(os.fstat(spec.fd).st_mode):
            raise OSError
        sock = socket.socket(fileno=spec.fd)
    except OSError:
        raise KeyvalError(f"File descriptor '{spec.fd}' is not a socket") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise KeyvalError(f"File descriptor '{spec.fd}' is not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        try:
            sock.listen(1)
        except OSError as e:
            sock.detach()
            raise KeyvalError(f"File descriptor '{spec.fd}': listen: {e.strerror}") from None
    return sock


def _wait_for_client(spec: ChardevSpec, sock: socket.socket) -> socket.socket:
    where = f"unix:{spec.path}" if spec.path is not None else f"fd:{spec.fd}"
    sys.stderr.write(
        f"pyvhost-blk: --chardev {spec.text}: info: QEMU waiting for connection on: "
        f"disconnected:{where},server=on\n"
    )
    sys.stderr.flush()
    sock.setblocking(True)
    conn, _ = sock.accept()
    return conn


def create_monitors(
    chardevs: list[tuple[str, ParsedOption]],
    monitors: list[tuple[str, ParsedOption]],
    dispatcher: QmpDispatcher,
    *,
    wait_for_client: Callable[[ChardevSpec, socket.socket], socket.socket] = _wait_for_client,
) -> list[Monitor]:
    """Build one :class:`Monitor` per ``--monitor``, on the socket of its ``--chardev``.

    ``chardevs``/``monitors`` are ``CommandLine.of("chardev")`` / ``of("monitor")``.  Main
    thread (the dispatcher's context), before the loop runs.  On error nothing stays open and
    :class:`MonitorOptionError` is raised.
    """
    specs: dict[str, ChardevSpec] = {}
    for text, p in chardevs:
        try:
            spec = parse_chardev(text, p)
            if spec.id in specs:
                raise KeyvalError(f"Chardev '{spec.id}' already exists")
        except KeyvalError as e:
            raise MonitorOptionError("chardev", text, str(e)) from None
        specs[spec.id] = spec
    wanted: list[tuple[MonitorSpec, ChardevSpec]] = []
    used: set[str] = set()
    for text, p in monitors:
        try:
            mspec = parse_monitor(text, p)
            cspec = specs.get(mspec.chardev)
            if cspec is None:
                raise KeyvalError(f'chardev "{mspec.chardev}" not found')
            if mspec.mode == "readline":
                raise KeyvalError("Only QMP is supported")
            if mspec.chardev in used:
                raise KeyvalError(f"Device '{mspec.chardev}' is in use")
        except KeyvalError as e:
            raise MonitorOptionError("monitor", text, str(e)) from None
        used.add(mspec.chardev)
        wanted.append((mspec, cspec))
    created: list[Monitor] = []
    try:
        for mspec, cspec in wanted:
            try:
                listener = _open_listener(cspec)
            except KeyvalError as e:
                raise MonitorOptionError("chardev", cspec.text, str(e)) from None
            try:
                conn = wait_for_client(cspec, listener) if cspec.wait else None
                created.append(Monitor(dispatcher, listener, cspec.path, name=cspec.id,
                                       pretty=mspec.pretty, conn=conn))
            except BaseException:
                listener.close()
                if cspec.path:
                    _unlink(cspec.path)
                raise
    except BaseException:
        for m in created:
            m.close()
        raise
    return created


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
