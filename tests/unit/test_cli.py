"""Command line parsing, Daemon.configure() validation and the console script's exit codes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from blocklayer import bdrv
from blocklayer.aio import qemu_get_aio_context
from pyvhost_blk import __version__
from pyvhost_blk.cli import USAGE, UsageError, parse_args
from pyvhost_blk.daemon import Daemon
from pyvhost_blk.main import main
from tests.unit.conftest import _allowed_fds, forget_node, unique


# -- parse_args -------------------------------------------------------------------------------
def test_empty_command_line():
    cl = parse_args([])
    assert cl.items == [] and not cl.help and not cl.version
    assert cl.pidfile is None and cl.stats_file is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--blockdev", "driver=null-co,node-name=a"],
        ["--blockdev=driver=null-co,node-name=a"],
    ],
)
def test_space_and_equals_forms(argv):
    cl = parse_args(argv)
    assert len(cl.items) == 1
    opt, text, parsed = cl.items[0]
    assert opt == "blockdev"
    assert text == "driver=null-co,node-name=a"
    assert parsed.values == {"driver": "null-co", "node-name": "a"}
    assert parsed.from_json is False


def test_value_may_contain_equals_signs():
    cl = parse_args(["--export=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s=1"])
    (_, _, p), = cl.items
    assert p.values["addr"] == {"type": "unix", "path": "/s=1"}


def test_implied_keys():
    cl = parse_args([
        "--export", "vhost-user-blk,id=e",
        "--object", "iothread,id=io0",
    ])
    assert cl.of("export")[0][1].values == {"type": "vhost-user-blk", "id": "e"}
    assert cl.of("object")[0][1].values == {"qom-type": "iothread", "id": "io0"}


def test_json_values():
    text = '{"driver": "null-co", "node-name": "j", "size": 4096, "read-zeroes": true}'
    for argv in (["--blockdev", text], [f"--blockdev={text}"]):
        cl = parse_args(argv)
        (opt, t, p), = cl.items
        assert (opt, t) == ("blockdev", text)
        assert p.from_json is True
        assert p.values == {"driver": "null-co", "node-name": "j", "size": 4096,
                            "read-zeroes": True}


def test_json_export_with_nested_addr():
    text = ('{"type": "vhost-user-blk", "id": "e", "node-name": "n", '
            '"addr": {"type": "unix", "path": "/tmp/s"}, "iothread": ["a", "b"]}')
    (_, _, p), = parse_args(["--export", text]).items
    assert p.values["addr"] == {"type": "unix", "path": "/tmp/s"}
    assert p.values["iothread"] == ["a", "b"]


def test_order_is_kept_and_of_filters():
    cl = parse_args([
        "--export", "vhost-user-blk,id=e1",
        "--blockdev", "driver=null-co,node-name=a",
        "--export=vhost-user-blk,id=e2",
    ])
    assert [o for o, _, _ in cl.items] == ["export", "blockdev", "export"]
    assert [p.values["id"] for _, p in cl.of("export")] == ["e1", "e2"]


@pytest.mark.parametrize("argv", [["--pidfile", "/run/p"], ["--pidfile=/run/p"]])
def test_pidfile(argv):
    assert parse_args(argv).pidfile == "/run/p"


def test_stats_file():
    assert parse_args(["--stats-file", "/tmp/s.json"]).stats_file == "/tmp/s.json"
    assert parse_args(["--stats-file=/tmp/t.json"]).stats_file == "/tmp/t.json"


def test_log_format():
    assert parse_args([]).log_format == "text"
    assert parse_args(["--log-format", "json"]).log_format == "json"
    assert parse_args(["--log-format=text"]).log_format == "text"
    with pytest.raises(UsageError) as ei:
        parse_args(["--log-format", "yaml"])
    assert str(ei.value) == "--log-format yaml: invalid log format (expected 'text' or 'json')"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag):
    assert parse_args([flag]).help is True


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag):
    assert parse_args([flag]).version is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frobnicate", "x"], "unrecognized option '--frobnicate'"),
        (["--frobnicate=x"], "unrecognized option '--frobnicate=x'"),
        (["--nbd-server", "addr.type=unix"], "unrecognized option '--nbd-server'"),
        (["blockdev"], "Unexpected argument: blockdev"),
        (["-x"], "Unexpected argument: -x"),
        (["--export"], "option '--export' requires an argument"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["--pidfile"], "option '--pidfile' requires an argument"),
        (["--blockdev", "driver=null-co", "--object"], "option '--object' requires an argument"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(UsageError) as ei:
        parse_args(argv)
    assert str(ei.value) == message


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blockdev", "{"], "--blockdev {: JSON parse error, premature EOI"),
        (["--blockdev", '{"a": 1} x'], None),
        (["--export", "vhost-user-blk,help"],
         "--export vhost-user-blk,help: Help is not available for this option"),
    ],
)
def test_option_syntax_errors_name_the_option(argv, message):
    with pytest.raises(UsageError) as ei:
        parse_args(argv)
    msg = str(ei.value)
    assert msg.startswith(f"{argv[0]} {argv[1]}: ")
    assert "\n" not in msg
    if message is not None:
        assert msg == message


# -- Daemon.configure -------------------------------------------------------------------------
@pytest.fixture
def daemon(main_ctx):
    """A Daemon; at teardown abort() it and release whatever it still holds."""
    nodes_before = set(bdrv._nodes)
    fds_before = set(main_ctx._handlers)
    d = Daemon()
    yield d
    d.abort()
    for t in d.iothreads.values():
        assert not t._thread.is_alive()
        t.ctx.close()
    # abort() closes the listening sockets but leaves their fd handlers registered (see
    # test_abort_removes_listener_fd_handler): drop them so later tests are unaffected.
    for fd in set(main_ctx._handlers) - fds_before - _allowed_fds(main_ctx):
        main_ctx.set_fd_handler(fd, None)
    for exp in d.exports.values():
        exp.delete()
    for name in set(bdrv._nodes) - nodes_before:
        forget_node(bdrv._nodes[name])


@pytest.fixture
def names():
    """Fresh node-name / socket path pairs."""
    return lambda: unique("cli")


def configure(d: Daemon, *argv: str) -> None:
    d.configure(parse_args(list(argv)))


def export_arg(node: str, sock: str, extra: str = "", eid: str = "e0") -> str:
    s = f"type=vhost-user-blk,id={eid},node-name={node},addr.type=unix,addr.path={sock}"
    return s + ("," + extra if extra else "")


@pytest.mark.parametrize(
    "extra, message",
    [
        ("num-queues=0", "num-queues must be greater than 0"),
        ("num-queues=65", "num-queues must not exceed 64"),
        ("num-queues=-1", "Parameter 'num-queues' expects uint16_t"),
        ("iothread=nosuch", 'iothread "nosuch" not found'),
        ("iothread.0=nosuch", 'iothread "nosuch" not found'),
        ("logical-block-size=1000",
         "Property e0.logical-block-size doesn't take value '1000': it must be a power of 2 "
         "between 512 and 32768"),
        ("logical-block-size=256", "logical-block-size doesn't take value '256'"),
        ("logical-block-size=65536", "logical-block-size doesn't take value '65536'"),
        ("bogus=1", "Parameter 'bogus' is unexpected"),
        ("writable=maybe", "Parameter 'writable' expects 'on' or 'off'"),
        ("writethrough=1", "Parameter 'writethrough' expects 'on' or 'off'"),
    ],
)
def test_export_option_errors(daemon, tmp_path, names, extra, message):
    node = names()
    sock = str(tmp_path / "s.sock")
    arg = export_arg(node, sock, extra)
    with pytest.raises(UsageError) as ei:
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node}", "--export", arg)
    msg = str(ei.value)
    assert msg.startswith(f"--export {arg}: ")
    assert message in msg
    assert "\n" not in msg
    assert not os.path.exists(sock)  # refused before listening
    assert daemon.exports == {}


def test_export_of_missing_node(daemon, tmp_path):
    sock = str(tmp_path / "s.sock")
    arg = export_arg("ghost", sock)
    with pytest.raises(UsageError) as ei:
        configure(daemon, "--export", arg)
    assert str(ei.value) == f"--export {arg}: Cannot find device=ghost nor node-name=ghost"
    assert not os.path.exists(sock)


@pytest.mark.parametrize("etype", ["nbd", "fuse", "vduse-blk"])
def test_export_bad_type(daemon, tmp_path, names, etype):
    node = names()
    arg = f"type={etype},id=e,node-name={node},addr.type=unix,addr.path={tmp_path}/s"
    with pytest.raises(UsageError) as ei:
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node}", "--export", arg)
    assert str(ei.value) == f"--export {arg}: Parameter 'type' does not accept value '{etype}'"


def test_export_missing_keys(daemon, tmp_path, names):
    node = names()
    with pytest.raises(UsageError, match="Parameter 'id' is missing"):
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
                  "--export", f"vhost-user-blk,node-name={node},addr.type=unix,"
                  f"addr.path={tmp_path}/s")
    with pytest.raises(UsageError, match="Parameter 'addr' is missing"):
        configure(daemon, "--export", f"vhost-user-blk,id=e,node-name={node}")


def test_export_bad_addr_type(daemon, tmp_path, names):
    node = names()
    with pytest.raises(UsageError, match="Parameter 'addr.type' does not accept value 'inet'"):
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
                  "--export", f"vhost-user-blk,id=e,node-name={node},addr.type=inet")


def test_export_writable_on_read_only_node(daemon, tmp_path, names):
    node = names()
    sock = str(tmp_path / "s.sock")
    with pytest.raises(UsageError) as ei:
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node},read-only=on",
                  "--export", export_arg(node, sock, "writable=on"))
    assert str(ei.value).endswith(f": Block node '{node}' is read-only")
    assert not os.path.exists(sock)


def test_blockdev_error_is_one_line(daemon, tmp_path):
    missing = str(tmp_path / "missing.img")
    arg = f"driver=file,node-name={unique('cli')},filename={missing}"
    with pytest.raises(UsageError) as ei:
        configure(daemon, "--blockdev", arg)
    assert str(ei.value) == (
        f"--blockdev {arg}: Could not open '{missing}': No such file or directory"
    )


def test_object_errors(daemon):
    with pytest.raises(UsageError, match="Invalid object type 'memory-backend-ram'"):
        configure(daemon, "--object", "memory-backend-ram,id=m")
    with pytest.raises(UsageError, match="Parameter 'id' is missing"):
        configure(daemon, "--object", "iothread")
    with pytest.raises(UsageError, match="Parameter 'poll-max-ns' expects integer"):
        configure(daemon, "--object", "iothread,id=x,poll-max-ns=fast")


def test_main_loop_object(daemon):
    """qsd's ``--object main-loop``; ``poll-max-ns`` on it is ours (the main loop's polling)."""
    ctx = qemu_get_aio_context()
    before = ctx.poll_stats["poll-max-ns"]
    try:
        with pytest.raises(UsageError, match="Parameter 'poll-max-ns' expects integer"):
            configure(daemon, "--object", "main-loop,id=ml,poll-max-ns=fast")
        with pytest.raises(UsageError, match="Parameter 'poll-grow' is unexpected"):
            configure(daemon, "--object", "main-loop,id=ml,poll-grow=2")
        configure(daemon, "--object", "main-loop,id=ml,poll-max-ns=1000,thread-pool-max=4")
        assert ctx.poll_stats["poll-max-ns"] == 1000
        with pytest.raises(UsageError, match="only one main-loop instance allowed"):
            configure(daemon, "--object", "main-loop,id=ml2")
    finally:
        ctx.set_poll_max_ns(before)


def test_monitor_errors_name_the_option(daemon, tmp_path):
    with pytest.raises(UsageError, match=r"^--monitor chardev=nope: chardev \"nope\" not found"):
        configure(daemon, "--chardev", f"socket,id=c,path={tmp_path}/q,server=on,wait=off",
                  "--monitor", "chardev=nope")
    assert not (tmp_path / "q").exists()


def test_monitor_socket_created_and_removed(daemon, tmp_path):
    configure(daemon, "--chardev", f"socket,id=c,path={tmp_path}/q,server=on,wait=off",
              "--monitor", "chardev=c")
    assert (tmp_path / "q").exists()
    daemon.abort()
    assert not (tmp_path / "q").exists()


def test_configure_success_then_abort_cleans_up(daemon, tmp_path, names):
    node = names()
    sock = str(tmp_path / "s.sock")
    pidfile = str(tmp_path / "pid")
    threads_before = threading.active_count()
    configure(
        daemon,
        "--object", "iothread,id=io0",
        "--object", "iothread,id=io1",
        "--blockdev", f"driver=null-co,node-name={node},size=1M",
        "--export", export_arg(node, sock,
                               "writable=on,num-queues=4,iothread.0=io0,iothread.1=io1,"
                               "logical-block-size=4096"),
        "--pidfile", pidfile,
    )
    assert threading.active_count() == threads_before + 2
    exp = daemon.exports["e0"]
    assert exp.num_queues == 4 and exp.writable and exp.logical_block_size == 4096
    ctxs = [exp.queue_context(i) for i in range(4)]
    assert ctxs == [daemon.iothreads["io0"].ctx, daemon.iothreads["io1"].ctx] * 2
    assert exp.config().capacity == 2048
    assert os.path.exists(sock)
    with open(pidfile) as f:
        assert f.read() == f"{os.getpid()}\n"
    daemon.abort()
    assert not os.path.exists(sock)
    assert not os.path.exists(pidfile)
    assert all(not t._thread.is_alive() for t in daemon.iothreads.values())
    assert threading.active_count() == threads_before


def test_configure_json_export(daemon, tmp_path, names):
    node = names()
    sock = str(tmp_path / "j.sock")
    configure(
        daemon,
        "--object", '{"qom-type": "iothread", "id": "jio"}',
        "--blockdev", f'{{"driver": "null-co", "node-name": "{node}", "size": 65536}}',
        "--export", f'{{"type": "vhost-user-blk", "id": "je", "node-name": "{node}", '
                    f'"writable": true, "num-queues": 2, "iothread": "jio", '
                    f'"addr": {{"type": "unix", "path": "{sock}"}}}}',
    )
    exp = daemon.exports["je"]
    assert exp.writable and exp.num_queues == 2
    assert exp.queue_context(1) is daemon.iothreads["jio"].ctx
    assert exp.get_features() & (1 << 12)  # MQ


@pytest.mark.parametrize("extra, queues", [("", 64), ("num-queues=64", 64), ("num-queues=1", 1)])
def test_export_num_queues_default(daemon, tmp_path, names, extra, queues):
    """Without num-queues an export offers 64 queues (qsd offers 1): QEMU's vhost-user-blk-pci,
    and so a libvirt guest without <driver queues>, asks for one queue per vCPU and refuses a
    backend with fewer.  The config space says the same; MQ is offered when there are several."""
    node = names()
    configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
              "--export", export_arg(node, str(tmp_path / "s.sock"), extra))
    exp = daemon.exports["e0"]
    assert exp.num_queues == queues
    assert exp.config().num_queues == queues
    assert bool(exp.get_features() & (1 << 12)) == (queues > 1)  # VIRTIO_BLK_F_MQ
    assert exp.server is not None
    assert exp.server.num_queues == queues  # vu_init max_queues: GET_QUEUE_NUM's answer


def test_configure_json_type_errors(daemon, tmp_path, names):
    node = names()
    msg = "Invalid parameter type for 'writable', expected: boolean"
    with pytest.raises(UsageError, match=msg):
        configure(
            daemon,
            "--blockdev", f"driver=null-co,node-name={node}",
            "--export", f'{{"type": "vhost-user-blk", "id": "e", "node-name": "{node}", '
                        f'"writable": "on", "addr": {{"type": "unix", "path": "{tmp_path}/s"}}}}',
        )


def test_duplicate_export_id(daemon, tmp_path, names):
    node = names()
    with pytest.raises(UsageError, match="Block export id 'e0' is already in use"):
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
                  "--export", export_arg(node, str(tmp_path / "a.sock")),
                  "--export", export_arg(node, str(tmp_path / "b.sock")))
    assert not os.path.exists(tmp_path / "b.sock")


def test_duplicate_iothread(daemon):
    with pytest.raises(UsageError, match="duplicate property 'io0'"):
        configure(daemon, "--object", "iothread,id=io0", "--object", "iothread,id=io0")


def test_socket_in_use_is_refused(daemon, tmp_path, names):
    path = str(tmp_path / "busy.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(path)
        live.listen(1)
        node = names()
        with pytest.raises(UsageError, match="in use by another process"):
            configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
                      "--export", export_arg(node, path))
        assert os.path.exists(path)  # never steal a live daemon's socket
    finally:
        live.close()


def test_stale_socket_is_replaced(daemon, tmp_path, names):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    node = names()
    configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
              "--export", export_arg(node, path))
    assert "e0" in daemon.exports
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(path)  # our listener now
    finally:
        c.close()


def test_non_socket_path_is_refused(daemon, tmp_path, names):
    path = tmp_path / "file"
    path.write_text("x")
    node = names()
    with pytest.raises(UsageError, match="exists and is not a socket"):
        configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
                  "--export", export_arg(node, str(path)))
    assert path.read_text() == "x"


def test_abort_removes_listener_fd_handler(daemon, main_ctx, tmp_path, names):
    """abort() must undo configure() entirely: a closed listener's fd handler left in the main
    AioContext shadows the next fd with that number (set_fd_handler then skips epoll)."""
    before = set(main_ctx._handlers)
    node = names()
    configure(daemon, "--blockdev", f"driver=null-co,node-name={node}",
              "--export", export_arg(node, str(tmp_path / "s.sock")))
    assert set(main_ctx._handlers) - before  # the listener is watched
    daemon.abort()
    assert set(main_ctx._handlers) - before == set()


def test_main_returns_1_and_cleans_up(tmp_path, capsys, names, main_ctx):
    """main() on a bad export: exit status 1, one line on stderr, nothing left behind."""
    node = names()
    sock = str(tmp_path / "s.sock")
    pidfile = str(tmp_path / "pid")
    rc = main(["--blockdev", f"driver=null-co,node-name={node}", "--pidfile", pidfile,
               "--export", export_arg(node, sock, "num-queues=0")])
    try:
        assert rc == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pyvhost-blk: --export ")
        assert "num-queues must be greater than 0" in err
        assert not os.path.exists(sock)
        assert not os.path.exists(pidfile)
    finally:
        if node in bdrv._nodes:
            forget_node(bdrv._nodes[node])


def test_main_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == USAGE
    assert main(["-V"]) == 0
    assert capsys.readouterr().out == f"pyvhost-blk {__version__}\n"


# -- the installed console script -------------------------------------------------------------
def _script() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "pyvhost-blk")
    if os.access(cand, os.X_OK):
        return cand
    found = shutil.which("pyvhost-blk")
    assert found, "the pyvhost-blk console script is not installed (run scripts/setup.sh)"
    return found


def _run(*argv: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([_script(), *argv], capture_output=True, text=True, timeout=30,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def test_script_missing_file(tmp_path):
    sock = str(tmp_path / "s.sock")
    r = _run("--blockdev", "driver=file,node-name=d,filename=/nonexistent",
             "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock}",
             cwd=str(tmp_path))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyvhost-blk:")
    assert "/nonexistent" in lines[0]
    assert "No such file or directory" in lines[0]
    assert r.stdout == ""
    assert not os.path.exists(sock)


def test_script_usage_error(tmp_path):
    r = _run("--bogus", cwd=str(tmp_path))
    assert r.returncode == 1
    assert r.stderr == "pyvhost-blk: unrecognized option '--bogus'\n"


def test_script_help(tmp_path):
    r = _run("--help", cwd=str(tmp_path))
    assert r.returncode == 0
    assert r.stdout.startswith("Usage: pyvhost-blk")
    assert "--blockdev" in r.stdout and "--export" in r.stdout
    assert r.stderr == ""
