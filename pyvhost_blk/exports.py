"""``--export`` / QMP ``block-export-add`` options → a running VhostUserBlkExport.

Options (qemu-storage-daemon's vhost-user-blk export, plus ours marked *):
``type``, ``id``, ``node-name``, ``writable``, ``writethrough``, ``iothread`` (one id or a list),
``fixed-iothread``, ``addr`` (``unix`` + ``path``, or ``fd`` + ``str``), ``logical-block-size``,
``num-queues`` (default 64, qsd's is 1: see DEFAULT_QUEUES), ``share-rw``\\*, ``removable``\\*,
``rerror``\\*, ``werror``\\*, ``serial``\\*,
``fast-path``\\* (on: requests C can serve skip Python; off: every request goes through the
node graph's Python code, in batches, e.g. to compare or debug), ``socket-mode``\\* (the UNIX
socket's permissions, octal, default 0600: only the daemon's user may connect).
Runs in the main thread.
"""

from __future__ import annotations

import socket
from typing import Any

from blocklayer.bdrv import bdrv_find_node
from blocklayer.block_backend import BlockdevOnError
from blocklayer.iothread import IOThread
from pyvhost_blk.keyval import (
    KeyvalError,
    check_keys,
    require,
    to_bool,
    to_dict,
    to_int,
    to_str,
    to_str_list,
)
from vhost.server import VuServer, listen_fd, listen_unix
from virtio.blk_export import DEFAULT_SERIAL, VhostUserBlkExport

EXPORT_KEYS = (
    "type", "id", "node-name", "writable", "writethrough", "iothread", "fixed-iothread",
    "addr", "logical-block-size", "num-queues", "share-rw", "removable", "rerror", "werror",
    "serial", "fast-path", "socket-mode", "x-inflight",
)
MAX_QUEUES = 64
# Default num-queues (qsd's is 1): the most we serve.  QEMU's vhost-user-blk-pci asks for one
# queue per vCPU unless told otherwise (libvirt: <driver queues='N'/>) and refuses a backend
# that offers fewer; a queue the frontend does not enable costs up to 33 KiB (struct pyvu_fastq)
# once a frontend connects, nothing before (docs/libvirt.md).
DEFAULT_QUEUES = MAX_QUEUES
RERROR = ("report", "ignore", "stop")
WERROR = ("report", "ignore", "enospc", "stop")


def _opt(v: dict[str, Any], key: str, conv: Any, default: Any, j: bool, *a: Any) -> Any:
    return conv(v[key], key, *a, from_json=j) if key in v else default


def _policy(v: dict[str, Any], key: str, allowed: tuple[str, ...], j: bool) -> BlockdevOnError:
    s = _opt(v, key, to_str, "report", j)
    if s not in allowed:
        raise KeyvalError(f"Parameter '{key}' does not accept value '{s}'")
    return BlockdevOnError(s)


def export_add(
    v: dict[str, Any], j: bool, iothreads: dict[str, IOThread],
    existing: dict[str, VhostUserBlkExport],
) -> VhostUserBlkExport:
    """Validate the options, create the export and start listening.  Raises KeyvalError,
    PermissionError (image locks, node permissions), OSError or SocketInUse."""
    etype = to_str(require(v, "type"), "type", from_json=j)
    if etype != "vhost-user-blk":
        raise KeyvalError(f"Parameter 'type' does not accept value '{etype}'")
    eid = to_str(require(v, "id"), "id", from_json=j)
    node_name = to_str(require(v, "node-name"), "node-name", from_json=j)
    addr = to_dict(require(v, "addr"), "addr")
    check_keys(v, EXPORT_KEYS)
    if eid in existing:
        raise KeyvalError(f"Block export id '{eid}' is already in use")
    bs = bdrv_find_node(node_name)
    if bs is None:
        raise KeyvalError(f"Cannot find device={node_name} nor node-name={node_name}")
    writable = _opt(v, "writable", to_bool, False, j)
    writethrough = _opt(v, "writethrough", to_bool, False, j)
    _opt(v, "fixed-iothread", to_bool, False, j)
    nq = _opt(v, "num-queues", to_int, DEFAULT_QUEUES, j, "uint16")
    if nq == 0:
        raise KeyvalError("num-queues must be greater than 0")
    if nq > MAX_QUEUES:
        raise KeyvalError(f"num-queues must not exceed {MAX_QUEUES}")
    lbs = _opt(v, "logical-block-size", to_int, 512, j, "uint64")
    if lbs < 512 or lbs > 32768 or lbs & (lbs - 1):
        raise KeyvalError(
            f"Property {eid}.logical-block-size doesn't take value '{lbs}': it must be a "
            "power of 2 between 512 and 32768"
        )
    contexts = []
    for name in _opt(v, "iothread", to_str_list, [], j):
        t = iothreads.get(name)
        if t is None:
            raise KeyvalError(f"iothread \"{name}\" not found")
        contexts.append(t.ctx)
    if writable and bs.read_only:
        raise KeyvalError(f"Block node '{node_name}' is read-only")
    exp = VhostUserBlkExport(
        eid, bs, writable, nq, lbs, contexts, writethrough,
        serial=_opt(v, "serial", to_str, DEFAULT_SERIAL, j),
        removable=_opt(v, "removable", to_bool, False, j),
        share_rw=_opt(v, "share-rw", to_bool, False, j),
        rerror=_policy(v, "rerror", RERROR, j),
        werror=_policy(v, "werror", WERROR, j),
        fast_path=_opt(v, "fast-path", to_bool, True, j),
        inflight=_opt(v, "x-inflight", to_bool, True, j),  # test-only: off = no crash safety
    )
    mode_text = _opt(v, "socket-mode", to_str, "0600", j)
    try:
        mode = int(mode_text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        exp.delete()
        raise KeyvalError(f"Parameter 'socket-mode' expects an octal mode such as 0660, "
                          f"not '{mode_text}'")
    try:
        listener, path = listen_on(addr, j, mode)
    except BaseException:
        exp.delete()
        raise
    exp.attach_server(VuServer(eid, exp, listener, path))
    return exp


def listen_on(addr: dict[str, Any], j: bool,
              mode: int = 0o600) -> tuple[socket.socket, str | None]:
    """A listening socket for a QAPI SocketAddress (unix or an inherited fd).  ``addr.str``
    of ``fd`` is a fd number, as in qsd, or a socket-activation name (``LISTEN_FDNAMES``,
    systemd's ``FileDescriptorName=``) where qsd would take a monitor fd name."""
    from pyvhost_blk import systemd  # only addr.type=fd needs it

    atype = to_str(require(addr, "type", "addr"), "addr.type", from_json=j)
    if atype == "unix":
        check_keys(addr, ("type", "path", "abstract", "tight"), "addr")
        path = to_str(require(addr, "path", "addr"), "addr.path", from_json=j)
        return listen_unix(path, mode), path
    if atype == "fd":
        check_keys(addr, ("type", "str"), "addr")
        s = to_str(require(addr, "str", "addr"), "addr.str", from_json=j)
        try:
            fd = systemd.activation().take(s)
            what = f"fd {fd}" + ("" if systemd.is_number(s) else
                                 f" (socket-activation name '{s}')")
            systemd.check_listener(fd, what)
        except systemd.ActivationError as e:
            raise KeyvalError(f"addr.str '{s}': {e}") from None
        return listen_fd(fd), None
    raise KeyvalError(f"Parameter 'addr.type' does not accept value '{atype}'")
