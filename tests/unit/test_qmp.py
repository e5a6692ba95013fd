"""The QMP monitor (pyvhost_blk/qmp.py) and --chardev/--monitor (pyvhost_blk/chardev.py).

Each test gets a private AioContext whose loop runs in a background thread (the main context
is never touched); clients are plain blocking sockets, plus one test with the qemu.qmp library.
Expected texts were taken from qemu-storage-daemon 7.2 with a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from blocklayer.aio import AioContext
from pyvhost_blk import __version__
from pyvhost_blk.chardev import MonitorOptionError, create_monitors
from pyvhost_blk.cli import UsageError, parse_args
from pyvhost_blk.qmp import (
    OUTBUF_MAX,
    JsonStreamer,
    Monitor,
    QmpDispatcher,
    QmpError,
    arg_bool,
    arg_int,
    arg_str,
    args_check,
    json_encode,
)
from vhost.server import listen_unix

VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": f"pyvhost-blk {__version__}"}
GREETING = {"QMP": {"version": VERSION, "capabilities": ["oob"]}}
NEG = b'{"execute": "qmp_capabilities"}'


# -- harness -------------------------------------------------------------------------------
class Env:
    """A dispatcher on a private AioContext whose loop runs in a thread."""

    def __init__(self, tmp_path: Any, on_quit: Callable[[], None] | None = None) -> None:
        self.tmp = tmp_path
        self.ctx = AioContext("qmp-test")
        self.disp = QmpDispatcher(on_quit, ctx=self.ctx)
        self.monitors: list[Monitor] = []
        self.thread = threading.Thread(target=self.ctx.run, name="qmp-test-loop", daemon=True)
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) in the loop thread and return its result."""
        done = threading.Event()
        box: list[Any] = [None, None]

        def run() -> None:
            try:
                box[0] = fn(*args)
            except BaseException as e:  # noqa: B036 - re-raised in the caller
                box[1] = e
            done.set()

        self.ctx.schedule(run)
        assert done.wait(5), "loop thread did not answer"
        if box[1] is not None:
            raise box[1]
        return box[0]

    def monitor(self, name: str = "qmp.sock", pretty: bool = False) -> str:
        path = str(self.tmp / name)
        listener = listen_unix(path)
        self.monitors.append(
            self.call(lambda: Monitor(self.disp, listener, path, name=name, pretty=pretty))
        )
        return path

    def stop(self) -> None:
        for m in self.monitors:
            self.call(m.close)
        self.ctx.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        leaked = set(self.ctx._handlers)
        self.ctx.close()
        assert not leaked, f"fd handlers left behind: {leaked}"


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.stop()


class Client:
    def __init__(self, path: str, greeting: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        if greeting:
            self.greeting = self.msg()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self, timeout: float = 5.0) -> bytes:
        """One raw output line, including its \\r\\n."""
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, f"EOF; buffered: {self.buf!r}"
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def msg(self, timeout: float = 5.0) -> Any:
        return json.loads(self.line(timeout))

    def cmd(self, execute: str, arguments: dict | None = None, **extra: Any) -> Any:
        req: dict[str, Any] = {"execute": execute, **extra}
        if arguments is not None:
            req["arguments"] = arguments
        self.send(json.dumps(req))
        return self.msg()

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def silent(self, wait: float = 0.2) -> bool:
        """Nothing arrives within ``wait`` seconds (and the connection is still open)."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buf += data
        return False

    def eof(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def err(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}


# -- greeting and negotiation --------------------------------------------------------------
def test_greeting(env):
    path = env.monitor()
    c = Client(path, greeting=False)
    assert c.line() == (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
        b'"package": "pyvhost-blk ' + __version__.encode() + b'"}, "capabilities": ["oob"]}}\r\n'
    )
    c.close()


def test_negotiation(env):
    c = Client(env.monitor())
    assert c.greeting == GREETING
    expecting = err("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
    assert c.cmd("query-version") == expecting
    assert c.cmd("no-such-command") == expecting
    assert c.cmd("query-version", id=7) == {"id": 7, **expecting}
    assert c.cmd("qmp_capabilities", {"x": 1}) == err("Parameter 'x' is unexpected")
    assert c.cmd("qmp_capabilities", {"enable": "oob"}) == err(
        "Invalid parameter type for 'enable', expected: array")
    assert c.cmd("qmp_capabilities", {"enable": [1]}) == err(
        "Invalid parameter type for 'enable[0]', expected: string")
    assert c.cmd("qmp_capabilities", {"enable": ["foo"]}) == err(
        "Parameter 'null' does not accept value 'foo'")
    assert c.cmd("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
    assert c.cmd("qmp_capabilities") == err(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    assert c.cmd("query-version") == {"return": VERSION}
    names = [e["name"] for e in c.cmd("query-commands")["return"]]
    assert {"qmp_capabilities", "query-version", "query-commands"} <= set(names)
    assert "quit" not in names and "query-qmp-schema" not in names
    c.close()


def test_oob_capability(env):
    c = Client(env.monitor())
    assert c.cmd("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    c.send('{"exec-oob": "query-version", "id": 4}')
    assert c.msg() == {"id": 4, **err("The command query-version does not support OOB")}
    c.send('{"exec-oob": "nope"}')
    assert c.msg() == err("The command nope has not been found", "CommandNotFound")
    c.send('{"execute": "query-version", "exec-oob": "query-version"}')
    assert c.msg() == err("QMP input member 'execute' clashes with 'exec-oob'")
    c.close()
    c = Client(env.monitor("b.sock"))
    c.negotiate()
    c.send('{"exec-oob": "query-version"}')  # oob not enabled on this one
    assert c.msg() == err("QMP input member 'exec-oob' is unexpected")
    c.close()


def test_id_echo_and_member_order(env):
    c = Client(env.monitor())
    c.negotiate()
    for rid in (5, "x", [1, {"a": 2}], None, {"a": 1.5}, True):
        assert c.cmd("query-version", id=rid) == {"return": VERSION, "id": rid}
        assert c.cmd("nope", id=rid)["id"] == rid
    c.send('{"execute": "qmp_capabilities", "id": 1}')
    assert c.line().startswith(b'{"id": 1, "error": {"class": "CommandNotFound", "desc": ')
    env.disp.register("nothing", lambda args: None)
    c.send('{"execute": "nothing", "id": [1]}')
    assert c.line() == b'{"return": {}, "id": [1]}\r\n'
    c.send('{"execute": "nothing", "id": "\\u00e9\\ud83d\\ude00\\u007f"}')
    assert c.line() == b'{"return": {}, "id": "\\u00E9\\uD83D\\uDE00\\u007F"}\r\n'
    c.close()


def test_fragmented_and_concatenated_input(env):
    c = Client(env.monitor())
    for b in NEG:
        c.send(bytes([b]))
    assert c.msg() == {"return": {}}
    c.send(b'{"execute": "query-version", "id": 1}{"execute": "nope", "id": 2}\n'
           b'  {"execute"  :\n "query-version", "id": 3}')
    assert c.msg()["id"] == 1
    assert c.msg()["id"] == 2
    assert c.msg()["id"] == 3
    # more requests in one go than the per-client queue holds: all answered, in order
    c.send(b"".join(b'{"execute": "query-version", "id": %d}' % i for i in range(100)))
    assert [c.msg()["id"] for _ in range(100)] == list(range(100))
    # a number needs a delimiter before it is complete, like in QEMU
    c.send(b"1")
    assert c.silent()
    c.send(b" ")
    assert c.msg() == err("QMP input must be a JSON object")
    c.close()


MALFORMED = [
    (b"[1]", "QMP input must be a JSON object"),
    (b'"abc"', "QMP input must be a JSON object"),
    (b"null ", "QMP input must be a JSON object"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "query-version", "xyz": 1}', "QMP input member 'xyz' is unexpected"),
    (b'{"execute": "query-version", "arguments": 1}',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "query-version", "arguments": null}',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "query-version", "arguments": {"a": 1}}', "Parameter 'a' is unexpected"),
    (b"{bad}", "JSON parse error, invalid keyword 'bad'"),
    (b"@", "JSON parse error, stray '@'"),
    (b"True ", "JSON parse error, stray 'T'"),
    (b"]", "JSON parse error, expecting value"),
    (b'{"execute": "query-version",}', "JSON parse error, expecting value"),
    (b'{"execute": "q" "x": 1}', "JSON parse error, expected separator in dict"),
    (b'{"execute"}', "JSON parse error, missing : in object pair"),
    (b"{1: 2}", "JSON parse error, key is not a string in object"),
    (b'{"execute": "q", "id": 1, "id": 2}', "JSON parse error, duplicate key"),
    (b"[1 2]", "JSON parse error, expected separator in list"),
    (b'{"a": 1.5e}', "JSON parse error, stray '1.5e}'"),
    (b'{"a": "\\x"}', "JSON parse error, invalid escape sequence in string"),
    (b'{"execute": "x\xc3"}', "JSON parse error, invalid UTF-8 sequence in string"),
    (b'{"execute": "q\\ud800"}', "JSON parse error, \\ud800 is not a valid Unicode character"),
    (b"\xff", "JSON parse error, stray '\ufffd'"),
]


@pytest.mark.parametrize("data,desc", MALFORMED)
def test_malformed_input(env, data, desc):
    c = Client(env.monitor())
    c.negotiate()
    c.send(data)
    assert c.msg() == err(desc)
    assert c.silent(0.05)
    assert c.cmd("query-version") == {"return": VERSION}  # the stream recovered
    c.close()


def test_lexer_recovery_and_extensions(env):
    c = Client(env.monitor())
    c.negotiate()
    c.send(b'{"execute":"query-version"}] garbage {"execute":"x"}{"a":01, "b": 2}')
    assert c.msg() == {"return": VERSION}
    assert c.msg() == err("JSON parse error, expecting value")
    assert c.msg() == err("JSON parse error, invalid keyword 'garbage'")
    assert c.msg() == err("The command x has not been found", "CommandNotFound")
    assert c.msg() == err("JSON parse error, stray '01'")
    assert c.msg() == err("JSON parse error, expecting value")  # skipped up to the '}'
    c.send(b"{'execute': 'query-version', 'id': 'single'}")  # QEMU accepts single quotes
    assert c.msg() == {"return": VERSION, "id": "single"}
    c.send(b"[" * 1030 + b"]" * 1030)  # the 1025th '[' is one too deep
    assert c.msg() == err("JSON nesting depth limit exceeded")
    assert c.msg() == err("QMP input must be a JSON object")  # the tail, parsed afresh
    assert all(c.msg() == err("JSON parse error, expecting value") for _ in range(1025))
    c.close()


def test_streamer_directly():
    out: list[tuple[Any, str | None]] = []
    s = JsonStreamer(lambda o, e: out.append((o, e)))
    for b in b'{"a": [1, -2.5e3, true, null, "\xc3\xa9"]}':
        s.feed(bytes([b]))
    assert out == [({"a": [1, -2500.0, True, None, "\u00e9"]}, None)]


def test_json_encode():
    assert json_encode({"a": [0.1, 1.0, "\n\"\\/"], "b": {}}) == \
        '{"a": [0.10000000000000001, 1, "\\n\\"\\\\/"], "b": {}}'
    assert json_encode({"return": {}, "id": [1]}, pretty=True) == \
        '{\r\n    "return": {\r\n    },\r\n    "id": [\r\n        1\r\n    ]\r\n}'
    with pytest.raises(TypeError):
        json_encode({"a": object()})


def test_pretty_monitor(env):
    c = Client(env.monitor(pretty=True), greeting=False)
    c.sock.settimeout(5)
    while not c.buf.endswith(b"}\r\n"):
        c.buf += c.sock.recv(4096)
    assert json.loads(c.buf) == GREETING
    assert c.buf.startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n')
    c.buf = b""
    c.send(NEG)
    lines = [c.line() for _ in range(3)]
    assert lines == [b"{\r\n", b'    "return": {\r\n', b"    }\r\n"]
    assert c.line() == b"}\r\n"
    c.close()


# -- commands --------------------------------------------------------------------------------
def test_unknown_command(env):
    c = Client(env.monitor())
    c.negotiate()
    assert c.cmd("block-export-del", id=3) == {
        "id": 3, **err("The command block-export-del has not been found", "CommandNotFound")}
    c.close()


def test_sync_command_and_arg_helpers(env):
    def add(args):
        a = arg_int(args, "a")
        b = arg_int(args, "b", "uint8", default=1)
        neg = arg_bool(args, "negate", default=False)
        name = arg_str(args, "name", default="sum")
        args_check(args, required=("a",), optional=("b", "negate", "name"))
        return {name: -(a + b) if neg else a + b}

    def fail(args):
        raise QmpError("DeviceNotFound", "No such thing")

    def fail_generic(args):
        raise QmpError("just a message")

    env.disp.register("add", add)
    env.disp.register("fail", fail)
    env.disp.register("fail-generic", fail_generic)
    with pytest.raises(ValueError):
        env.disp.register("add", add)
    c = Client(env.monitor())
    c.negotiate()
    assert c.cmd("add", {"a": 2, "b": 3}) == {"return": {"sum": 5}}
    assert c.cmd("add", {"a": 2, "negate": True, "name": "n"}) == {"return": {"n": -3}}
    assert c.cmd("add", {}) == err("Parameter 'a' is missing")
    assert c.cmd("add", {"a": "x"}) == err("Invalid parameter type for 'a', expected: integer")
    assert c.cmd("add", {"a": 1, "b": 300}) == err("Parameter 'b' expects uint8_t")
    assert c.cmd("add", {"a": 1, "negate": 1}) == err(
        "Invalid parameter type for 'negate', expected: boolean")
    assert c.cmd("add", {"a": 1, "c": 1}) == err("Parameter 'c' is unexpected")
    assert c.cmd("add") == err("Parameter 'a' is missing")  # no "arguments" means {}
    assert c.cmd("fail", id=1) == {"id": 1, **err("No such thing", "DeviceNotFound")}
    assert c.cmd("fail-generic") == err("just a message")
    c.close()


def test_async_command_keeps_order(env):
    pending: list[Callable[[Any], None]] = []
    env.disp.register("slow", lambda args, complete: pending.append(complete), is_async=True)
    env.disp.register("fast", lambda args: "fast")
    c = Client(env.monitor())
    c.negotiate()
    c.send('{"execute": "slow", "id": 1}{"execute": "fast", "id": 2}')
    assert c.silent(0.2)  # "fast" waits behind "slow", like QEMU's one-at-a-time dispatcher
    assert len(pending) == 1
    # complete from another thread: tolerated, the response is scheduled into the loop
    threading.Thread(target=pending[0], args=({"done": True},)).start()
    assert c.msg() == {"return": {"done": True}, "id": 1}
    assert c.msg() == {"return": "fast", "id": 2}
    c.send('{"execute": "slow", "id": 3}')
    time.sleep(0.1)
    env.call(pending[1], QmpError("DeviceNotActive", "gone"))
    assert c.msg() == {"id": 3, **err("gone", "DeviceNotActive")}
    c.close()


def test_async_command_completing_synchronously(env):
    env.disp.register("now", lambda args, complete: complete(None), is_async=True)
    c = Client(env.monitor())
    c.negotiate()
    assert c.cmd("now") == {"return": {}}
    assert c.cmd("now", id=2) == {"return": {}, "id": 2}
    c.close()


def test_handler_exception_does_not_kill_the_daemon(env, caplog):
    def boom(args):
        raise RuntimeError("boom")

    def boom_async(args, complete):
        raise KeyError("k")

    env.disp.register("boom", boom)
    env.disp.register("boom-async", boom_async, is_async=True)
    env.disp.register("not-json", lambda args: {"x": object()})
    c = Client(env.monitor())
    c.negotiate()
    with caplog.at_level(logging.ERROR, logger="pyvhost_blk.qmp"):
        assert c.cmd("boom", id=1) == {"id": 1, **err("boom")}
        assert c.cmd("boom-async") == err("'k'")
        reply = c.cmd("not-json", id=2)
    assert reply["id"] == 2 and reply["error"]["class"] == "GenericError"
    assert "RuntimeError: boom" in caplog.text  # the traceback is logged
    assert c.cmd("query-version") == {"return": VERSION}
    c.close()


def test_quit(tmp_path):
    quits: list[bool] = []
    e = Env(tmp_path, on_quit=lambda: quits.append(True))
    try:
        c = Client(e.monitor())
        c.negotiate()
        assert c.cmd("quit", {"x": 1}) == err("Parameter 'x' is unexpected")
        assert not quits
        assert c.cmd("quit", id="q") == {"return": {}, "id": "q"}
        e.call(lambda: None)  # on_quit runs after the response, in the loop
        assert quits == [True]
        c.close()
    finally:
        e.stop()


# -- events ----------------------------------------------------------------------------------
def test_events_reach_negotiated_clients_only(env):
    a = Client(env.monitor("a.sock"))
    b = Client(env.monitor("b.sock"))
    c = Client(env.monitor("c.sock"))
    a.negotiate()
    c.negotiate()
    before = time.time()
    t = threading.Thread(target=env.disp.emit, args=("BLOCK_EXPORT_DELETED", {"id": "e0"}))
    t.start()
    t.join()
    for cl in (a, c):
        line = cl.line()
        assert line.startswith(b'{"timestamp": {"seconds": ')
        ev = json.loads(line)
        assert list(ev) == ["timestamp", "event", "data"]
        assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "e0"}
        ts = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
        assert before - 1 <= ts <= time.time() + 1
    assert b.silent()
    env.disp.emit("RESUME")
    assert list(a.msg()) == ["timestamp", "event"]  # no data: no "data" member
    for cl in (a, b, c):
        cl.close()


# -- connections -----------------------------------------------------------------------------
def test_second_client_waits_until_the_first_disconnects(env):
    path = env.monitor()
    first = Client(path)
    first.negotiate()
    second = Client(path, greeting=False)  # connect() succeeds: it waits in the backlog
    second.send('{"execute": "qmp_capabilities", "id": "early"}')
    assert second.silent(0.3)
    env.disp.emit("EV", {})
    assert first.msg()["event"] == "EV"
    first.close()
    assert second.msg() == GREETING
    assert second.msg() == {"return": {}, "id": "early"}
    # a new client starts un-negotiated again
    second.close()
    third = Client(path)
    assert third.cmd("query-version")["error"]["class"] == "CommandNotFound"
    third.close()


def test_close_removes_socket_and_disconnects(env):
    path = env.monitor()
    c = Client(path)
    mon = env.monitors.pop()
    assert os.path.exists(path)
    env.call(mon.close)
    assert not os.path.exists(path)
    assert c.eof()
    env.call(mon.close)  # idempotent
    c.close()


def test_slow_reader_does_not_block_the_loop(env):
    big = "x" * (4 << 20)
    env.disp.register("big", lambda args: big)
    slow = Client(env.monitor("slow.sock"))
    slow.negotiate()
    other = Client(env.monitor("other.sock"))
    other.negotiate()
    slow.send('{"execute": "big"}{"execute": "big"}')
    time.sleep(0.2)
    assert other.cmd("query-version") == {"return": VERSION}  # the loop is still serving
    slow.sock.settimeout(10)
    for _ in range(2):
        assert slow.msg(10) == {"return": big}
    assert OUTBUF_MAX > 2 * len(big)
    slow.close()
    other.close()


# -- the qemu.qmp library --------------------------------------------------------------------
def test_qemu_qmp_library(env):
    try:
        import qemu.qmp as qmp
    except ImportError:
        pytest.fail("qemu.qmp is not installed: run scripts/setup.sh (it installs the test "
                    "extra into .venv)", pytrace=False)
    path = env.monitor()

    async def session() -> tuple[Any, Any, Any]:
        client = qmp.QMPClient("pyvhost-blk-test")
        await client.connect(path)
        try:
            version = await client.execute("query-version")
            listener = qmp.EventListener()
            with client.listen(listener):
                threading.Thread(
                    target=env.disp.emit, args=("BLOCK_JOB_READY", {"device": "j0"})
                ).start()
                event = await asyncio.wait_for(listener.get(), 5)
            try:
                await client.execute("no-such-command")
            except qmp.ExecuteError as e:
                failure = e
            return version, event, failure
        finally:
            await client.disconnect()

    version, event, failure = asyncio.run(asyncio.wait_for(session(), 10))
    assert version == VERSION
    assert event["event"] == "BLOCK_JOB_READY" and event["data"] == {"device": "j0"}
    assert failure.error_class == "CommandNotFound"


# -- --chardev / --monitor -------------------------------------------------------------------
def _options(argv: list[str]) -> tuple[list, list]:
    cl = parse_args(argv)
    return cl.of("chardev"), cl.of("monitor")


@pytest.mark.parametrize(
    "argv,option,message",
    [
        (["--chardev", "socket,id=m0,server=on,wait=off"], "chardev",
         "chardev: socket: no path given (pyvhost-blk needs path= or fd=)"),
        (["--chardev", "socket,id=m0,path=P,server=off"], "chardev",
         "client mode (server=off) is not supported by pyvhost-blk: use server=on"),
        (["--chardev", "socket,id=m0,path=P"], "chardev",
         "client mode (server=off) is not supported by pyvhost-blk: use server=on"),
        (["--chardev", "socket,id=m0,path=P,server=off,wait=off"], "chardev",
         "'wait' option is incompatible with socket in client connect mode"),
        (["--chardev", "socket,id=m0,path=P,server=on,reconnect=1"], "chardev",
         "'reconnect' option is incompatible with socket in server listen mode"),
        (["--chardev", "socket,id=m0,path=P,fd=3,server=on"], "chardev",
         "None or one of 'path', 'fd' or 'host' option required."),
        (["--chardev", "socket,id=m0,path=P,server=maybe"], "chardev",
         "Parameter 'server' expects 'on' or 'off'"),
        (["--chardev", "socket,id=m0,path=P,server=on,foo=bar"], "chardev",
         "Invalid parameter 'foo'"),
        (["--chardev", "socket,path=P,server=on"], "chardev", "chardev: no id specified"),
        (["--chardev", "socket,id=0m,path=P,server=on"], "chardev",
         "Parameter 'id' expects an identifier"),
        (["--chardev", "id=m0"], "chardev", 'chardev: "m0" missing backend'),
        (["--chardev", "nope,id=m0"], "chardev", "'nope' is not a valid char driver name"),
        (["--chardev", "socket,id=m0,path=P,server=on",
          "--chardev", "socket,id=m0,path=Q,server=on"], "chardev",
         "Chardev 'm0' already exists"),
        (["--monitor", "chardev=nope"], "monitor", 'chardev "nope" not found'),
        (["--monitor", "nope"], "monitor", 'chardev "nope" not found'),
        (["--chardev", "socket,id=m0,path=P,server=on,wait=off", "--monitor", "m0,mode=readline"],
         "monitor", "Only QMP is supported"),
        (["--chardev", "socket,id=m0,path=P,server=on,wait=off", "--monitor", "m0,mode=foo"],
         "monitor", "Parameter 'mode' does not accept value 'foo'"),
        (["--chardev", "socket,id=m0,path=P,server=on,wait=off", "--monitor", "m0,pretty=maybe"],
         "monitor", "Parameter 'pretty' expects 'on' or 'off'"),
        (["--chardev", "socket,id=m0,path=P,server=on,wait=off", "--monitor", "m0,foo=1"],
         "monitor", "Parameter 'foo' is unexpected"),
        (["--monitor", "mode=control"], "monitor", "Parameter 'chardev' is missing"),
        (["--monitor", "m0,mode=readline"], "monitor", 'chardev "m0" not found'),
        (["--chardev", "socket,id=m0,path=P,server=on,wait=off", "--monitor", "m0",
          "--monitor", "m0"], "monitor", "Device 'm0' is in use"),
    ],
)
def test_chardev_and_monitor_option_errors(tmp_path, argv, option, message):
    argv = [a.replace("path=P", f"path={tmp_path}/p.sock") for a in argv]
    chardevs, monitors = _options(argv)
    ctx = AioContext("qmp-options")
    try:
        with pytest.raises(MonitorOptionError) as info:
            create_monitors(chardevs, monitors, QmpDispatcher(ctx=ctx))
        assert str(info.value) == message
        assert info.value.option == option
        assert not ctx._handlers
        assert not os.path.exists(f"{tmp_path}/p.sock")
    finally:
        ctx.close()


def test_monitor_on_live_socket_is_refused(tmp_path):
    path = str(tmp_path / "live.sock")
    live = listen_unix(path)
    ctx = AioContext("qmp-options")
    try:
        chardevs, monitors = _options(
            ["--chardev", f"socket,id=m0,path={path},server=on,wait=off", "--monitor", "m0"])
        with pytest.raises(MonitorOptionError) as info:
            create_monitors(chardevs, monitors, QmpDispatcher(ctx=ctx))
        assert info.value.option == "chardev" and "in use" in str(info.value)
        assert os.path.exists(path)  # someone else's socket is left alone
    finally:
        live.close()
        ctx.close()


def test_create_monitors(tmp_path):
    p1, p2, p3 = (str(tmp_path / n) for n in ("a.sock", "b.sock", "stale.sock"))
    stale = listen_unix(p3)
    stale.close()  # the file stays, nobody listens: replaced
    fd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd_sock.bind(str(tmp_path / "fd.sock"))
    fd = fd_sock.detach()
    chardevs, monitors = _options([
        "--chardev", f"socket,id=m0,path={p1},server=on,wait=off",
        "--chardev", f"socket,id=m1,path={p2},server=on,wait=off",
        "--chardev", f"socket,id=m2,path={p3},server=on,wait=off",
        "--chardev", f"socket,id=m3,fd={fd},server=on,wait=off",
        "--chardev", "socket,id=unused,path=/nonexistent/x.sock,server=on,wait=off",
        "--monitor", "m0",
        "--monitor", "chardev=m1,mode=control,pretty=on,id=mon1",
        "--monitor", '{"chardev": "m2", "pretty": false}',
        "--monitor", "m3",
    ])
    ctx = AioContext("qmp-create")
    disp = QmpDispatcher(ctx=ctx)
    mons = create_monitors(chardevs, monitors, disp)
    try:
        assert [m.pretty for m in mons] == [False, True, False, False]
        assert disp.monitors == mons
        assert all(os.path.exists(p) for p in (p1, p2, p3))
        c = Client(str(tmp_path / "fd.sock"), greeting=False)
        while not any(m.connected for m in mons):
            ctx.aio_poll(blocking=True, timeout=0.05)
        assert c.msg() == GREETING
        c.close()
    finally:
        for m in mons:
            m.close()
    assert not any(os.path.exists(p) for p in (p1, p2, p3))
    assert not ctx._handlers and disp.monitors == []
    ctx.close()


def test_chardev_wait_on_blocks_until_a_client_connects(tmp_path, capfd):
    path = str(tmp_path / "w.sock")
    chardevs, monitors = _options(
        ["--chardev", f"socket,id=m0,path={path},server=on", "--monitor", "m0"])
    got: list[Any] = []

    def connect_later() -> None:
        while not os.path.exists(path):
            time.sleep(0.01)
        c = Client(path)
        got.append(c)

    t = threading.Thread(target=connect_later)
    t.start()
    ctx = AioContext("qmp-wait")
    mons = create_monitors(chardevs, monitors, QmpDispatcher(ctx=ctx))
    t.join(5)
    try:
        assert got and got[0].greeting == GREETING
        assert mons[0].connected
        assert "QEMU waiting for connection on: disconnected:unix:" in capfd.readouterr().err
        got[0].send(NEG)
        while not got[0].buf and got[0].silent(0.01):
            ctx.aio_poll(blocking=False)
        assert got[0].msg() == {"return": {}}
        got[0].close()
    finally:
        mons[0].close()
    ctx.close()


def test_chardev_json_is_refused():
    with pytest.raises(UsageError):
        parse_args(["--chardev", "socket,id=m0,path=/x,server,nowait"])  # keyval rejects it
    chardevs, monitors = _options(["--chardev", '{"backend": "socket", "id": "m0"}'])
    ctx = AioContext("qmp-json")
    try:
        with pytest.raises(MonitorOptionError, match="key=value"):
            create_monitors(chardevs, monitors, QmpDispatcher(ctx=ctx))
    finally:
        ctx.close()
