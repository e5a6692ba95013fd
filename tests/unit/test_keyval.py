"""Unit tests for pyvhost_blk.keyval (QEMU keyval/JSON option parsing).

Expected error texts were taken from qemu-storage-daemon 7.2; the last test
re-checks a sample of them against the installed binary when there is one.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvhost_blk.keyval import (
    KeyvalError,
    ParsedOption,
    check_keys,
    child_name,
    parse_json_object,
    parse_keyval,
    parse_keyval_help,
    parse_option,
    parse_size,
    require,
    to_bool,
    to_dict,
    to_int,
    to_size,
    to_str,
    to_str_list,
)

U64 = (1 << 64) - 1


def err(fn, *args, **kwargs) -> str:
    with pytest.raises(KeyvalError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ----------------------------------------------------------------------------- keyval


class TestKeyvalSyntax:
    def test_flat(self):
        assert parse_keyval("driver=file,node-name=disk0") == {
            "driver": "file",
            "node-name": "disk0",
        }

    def test_empty_string(self):
        assert parse_keyval("") == {}
        assert parse_keyval("", "driver") == {}

    def test_empty_value(self):
        assert parse_keyval("a=,b=") == {"a": "", "b": ""}

    def test_trailing_comma_ignored(self):
        assert parse_keyval("a=1,") == {"a": "1"}

    @pytest.mark.parametrize(
        "text,value",
        [
            ("filename=a,,b.img", "a,b.img"),
            ("filename=a,,,,b", "a,,b"),
            ("filename=,,", ","),
            ("filename=x,,", "x,"),
            ("filename=a=b", "a=b"),
            ("filename=/p/q.r s", "/p/q.r s"),
        ],
    )
    def test_value_escaping(self, text, value):
        assert parse_keyval(text) == {"filename": value}

    def test_escaped_comma_then_more_keys(self):
        assert parse_keyval("filename=a,,b,,,c=d") == {"filename": "a,b,", "c": "d"}

    def test_values_stay_strings(self):
        assert parse_keyval("writable=on,num-queues=2") == {"writable": "on", "num-queues": "2"}

    def test_nested(self):
        assert parse_keyval("addr.type=unix,addr.path=/s,cache.direct=on") == {
            "addr": {"type": "unix", "path": "/s"},
            "cache": {"direct": "on"},
        }

    def test_deeply_nested(self):
        assert parse_keyval("a.b.c.d=1,a.b.e=2") == {"a": {"b": {"c": {"d": "1"}, "e": "2"}}}

    def test_list(self):
        assert parse_keyval("iothread.0=a,iothread.1=b") == {"iothread": ["a", "b"]}

    def test_list_any_order(self):
        assert parse_keyval("l.2=c,l.0=a,l.1=b") == {"l": ["a", "b", "c"]}

    def test_list_of_dicts(self):
        assert parse_keyval("s.0.host=h0,s.1.host=h1,s.0.port=1") == {
            "s": [{"host": "h0", "port": "1"}, {"host": "h1"}]
        }

    def test_list_of_lists(self):
        assert parse_keyval("m.0.0=a,m.0.1=b,m.1.0=c") == {"m": [["a", "b"], ["c"]]}

    def test_dict_in_list_in_dict(self):
        assert parse_keyval("a.b.0.c=x") == {"a": {"b": [{"c": "x"}]}}

    def test_index_with_leading_zero(self):
        assert parse_keyval("l.00=a,l.1=b") == {"l": ["a", "b"]}

    def test_last_value_wins(self):
        # QEMU 7.2 keyval does not reject duplicate keys.
        assert parse_keyval("id=io0,id=io1") == {"id": "io1"}
        assert parse_keyval("a.b=1,a.b=2") == {"a": {"b": "2"}}
        assert parse_keyval("l.0=x,l.0=y") == {"l": ["y"]}

    def test_key_characters(self):
        assert parse_keyval("a-_9=1,B=2,x-y.z_w=3") == {"a-_9": "1", "B": "2", "x-y": {"z_w": "3"}}

    def test_downstream_prefix(self):
        assert parse_keyval("__com.redhat_foo=1") == {"__com.redhat_foo": "1"}

    def test_key_127_chars_ok(self):
        key = "a" * 127
        assert parse_keyval(f"{key}=1,b.{key}=2") == {key: "1", "b": {key: "2"}}

    def test_result_order_is_first_occurrence(self):
        assert list(parse_keyval("b=1,a=2,b=3")) == ["b", "a"]


class TestImpliedKey:
    def test_object(self):
        assert parse_keyval("iothread,id=io0", "qom-type") == {"qom-type": "iothread", "id": "io0"}

    def test_only_implied(self):
        assert parse_keyval("vhost-user-blk", "type") == {"type": "vhost-user-blk"}

    def test_explicit_key_still_allowed(self):
        assert parse_keyval("qom-type=iothread,id=x", "qom-type") == {
            "qom-type": "iothread",
            "id": "x",
        }

    def test_only_first_element(self):
        assert err(parse_keyval, "id=x,iothread", "qom-type") == (
            "Expected '=' after parameter 'iothread'"
        )

    def test_implied_value_may_contain_dots_and_colons(self):
        assert parse_keyval("file.img:x,a=b", "driver") == {"driver": "file.img:x", "a": "b"}

    def test_implied_value_has_no_comma_escape(self):
        # "val-no-key" stops at the first ','; ",," is not an escape there.
        assert err(parse_keyval, "a,,b", "driver") == "Invalid parameter ''"
        assert err(parse_keyval, "iothread1,,,a.1b", "qom-type") == "Invalid parameter ''"

    def test_leading_equals_is_not_implied(self):
        assert err(parse_keyval, "=vhost-user-blk", "type") == "Invalid parameter ''"

    def test_no_implied_key_means_error(self):
        assert err(parse_keyval, "iothread,id=x") == "Expected '=' after parameter 'iothread'"


class TestHelp:
    @pytest.mark.parametrize("text", ["help", "?", "id=x,help", "help,id=e", "iothread,id=x,help"])
    def test_parse_keyval_rejects_help(self, text):
        assert err(parse_keyval, text, "qom-type") == "Help is not available for this option"

    def test_parse_keyval_help(self):
        assert parse_keyval_help("iothread,help", "qom-type") == ({"qom-type": "iothread"}, True)
        assert parse_keyval_help("help,id=x", "qom-type") == ({"id": "x"}, True)
        assert parse_keyval_help("?", "qom-type") == ({}, True)
        assert parse_keyval_help("iothread,id=x", "qom-type") == (
            {"qom-type": "iothread", "id": "x"},
            False,
        )

    def test_help_as_value_or_key_is_not_help(self):
        assert parse_keyval("helpme", "type") == {"type": "helpme"}
        assert parse_keyval("type=help") == {"type": "help"}
        assert parse_keyval("help=1") == {"help": "1"}


class TestKeyvalErrors:
    @pytest.mark.parametrize(
        "text,message",
        [
            ("=x", "Invalid parameter ''"),
            (",a=1", "Invalid parameter ''"),
            ("a=1,,,", None),  # a="1," -- valid, see below
            ("a$b=x", "Invalid parameter 'a$b'"),
            ("0=1", "Invalid parameter '0'"),
            ("_foo=1", "Invalid parameter '_foo'"),
            ("a..b=1", "Invalid parameter 'a..b'"),
            ("a.=1", "Invalid parameter 'a.'"),
            (".a=1", "Invalid parameter '.a'"),
            ("a.1b=1", "Invalid parameter 'a.1b'"),
            ("a b=1", "Invalid parameter 'a b'"),
            ("foo", "Expected '=' after parameter 'foo'"),
            ("id=x,foo", "Expected '=' after parameter 'foo'"),
            ("id=x,a.b", "Expected '=' after parameter 'a.b'"),
            ("id=x,a$b", "Invalid parameter 'a$b'"),
            ("a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
            ("a.b=2,a=1", "Parameters 'a.*' used inconsistently"),
            ("a.b.c=1,a.b=2", "Parameters 'a.b.*' used inconsistently"),
            ("a.b=1,a.b.c=2", "Parameters 'a.b.*' used inconsistently"),
            ("a.0=x,a.b=y", "Parameters 'a.*' used inconsistently"),
            ("x.a.0=x,x.a.b=y", "Parameters 'x.a.*' used inconsistently"),
            ("a.1=x", "Parameter 'a.0' missing"),
            ("a.0=x,a.2=y", "Parameter 'a.1' missing"),
            ("a.5=1,a.3=2,a.1=2", "Parameter 'a.0' missing"),
            ("a.0.1=x", "Parameter 'a.0.0' missing"),
            ("a.99999999999999999999=x", "Parameter 'a.0' missing"),
        ],
    )
    def test_errors(self, text, message):
        if message is None:
            assert parse_keyval(text) == {"a": "1,"}
        else:
            assert err(parse_keyval, text) == message

    def test_too_long(self):
        key = "a" * 128
        assert err(parse_keyval, f"{key}=1") == f"Parameter '{key}' is too long"
        assert err(parse_keyval, f"b.{key}=1") == f"Parameter fragment '{key}' is too long"
        assert err(parse_keyval, f"{key}.b=1") == f"Parameter fragment '{key}' is too long"

    def test_error_is_value_error(self):
        with pytest.raises(ValueError):
            parse_keyval("=")


# ----------------------------------------------------------------------------- JSON


class TestJson:
    def test_typed_values(self):
        assert parse_json_object(
            '{"a": "s", "b": 1, "c": -2, "d": 1.5, "e": true, "f": false, "g": null,'
            ' "h": [1, "x"], "i": {"j": {}}, "k": []}'
        ) == {
            "a": "s",
            "b": 1,
            "c": -2,
            "d": 1.5,
            "e": True,
            "f": False,
            "g": None,
            "h": [1, "x"],
            "i": {"j": {}},
            "k": [],
        }

    def test_whitespace(self):
        assert parse_json_object(' {\t"a" :\n1\r}  ') == {"a": 1}

    def test_empty_object(self):
        assert parse_json_object("{}") == {}

    def test_single_quotes(self):
        assert parse_json_object("{'driver':'null-co','x':'a\"b'}") == {
            "driver": "null-co",
            "x": 'a"b',
        }

    def test_escapes(self):
        assert parse_json_object(r'{"a": "\"\\\/\b\f\n\r\t\u0041\'"}') == {"a": "\"\\/\b\f\n\r\tA'"}
        assert parse_json_object(r"{'a': 'it\'s'}") == {"a": "it's"}

    def test_surrogate_pair(self):
        assert parse_json_object(r'{"a": "\ud83d\ude00"}') == {"a": "\U0001f600"}

    def test_numbers(self):
        v = parse_json_object(
            '{"a": 0, "b": -0, "c": 1e3, "d": 2.5E-1, "e": 9223372036854775807,'
            ' "f": 18446744073709551615, "g": 18446744073709551616, "h": -9223372036854775809}'
        )
        assert v["a"] == 0 and isinstance(v["a"], int)
        assert v["b"] == 0 and isinstance(v["b"], int)
        assert v["c"] == 1000.0 and isinstance(v["c"], float)
        assert v["d"] == 0.25
        assert v["e"] == (1 << 63) - 1
        assert v["f"] == U64 and isinstance(v["f"], int)
        # Outside int64/uint64 QEMU only has a double.
        assert isinstance(v["g"], float) and isinstance(v["h"], float)

    @pytest.mark.parametrize(
        "text,message",
        [
            ('{"a":1,"a":2}', "JSON parse error, duplicate key"),
            ('{"a":{"b":1,"b":1}}', "JSON parse error, duplicate key"),
            ("{", "JSON parse error, premature EOI"),
            ("{ ", "JSON parse error, premature EOI"),
            ('{"a":1,', "JSON parse error, premature EOI"),
            ('{"a":', "JSON parse error, premature EOI"),
            ('{"a":1,}', "JSON parse error, expecting value"),
            ('{"a":[1,]}', "JSON parse error, expecting value"),
            ('{"a":}', "JSON parse error, expecting value"),
            ('{"a":x}', "JSON parse error, invalid keyword 'x'"),
            ('{"a":nul}', "JSON parse error, invalid keyword 'nul'"),
            ('{"a"}', "JSON parse error, missing : in object pair"),
            ('{"a" 1}', "JSON parse error, missing : in object pair"),
            ('{"a":1 "b":2}', "JSON parse error, expected separator in dict"),
            ('{"a":0x10}', "JSON parse error, expected separator in dict"),
            ('{"a":[1,2 3]}', "JSON parse error, expected separator in list"),
            ("{1:2}", "JSON parse error, key is not a string in object"),
            ('{"a":"x}', "JSON parse error, stray '\"x}'"),
            ('{"a":NaN}', "JSON parse error, stray 'N'"),
            ('{qom-type:"iothread"}', "JSON parse error, stray '-t'"),
            ('{"a":1.}', "JSON parse error, stray '1.}'"),
            ('{"a":01}', "JSON parse error, stray '01'"),
            ('{"a":1e}', "JSON parse error, stray '1e}'"),
            ('{"a":"a\tb"}', "JSON parse error, stray '\"a\t'"),
            (r'{"a":"\q"}', "JSON parse error, invalid escape sequence in string"),
            (r'{"a":"\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'),
            (r'{"a":"\ud800b"}', "JSON parse error, \\ud800 is not a valid Unicode character"),
            (r'{"a":"\udc00"}', "JSON parse error, \\udc00 is not a valid Unicode character"),
            ('{"a":1} x', "Expecting at most one JSON value"),
            ('{"a":1}{}', "Expecting at most one JSON value"),
            ("[1]", "JSON value is not an object"),
            ('"s"', "JSON value is not an object"),
        ],
    )
    def test_errors(self, text, message):
        assert err(parse_json_object, text) == message

    def test_lexical_error_wins_over_grammar_error(self):
        # QEMU lexes a whole top-level value before parsing it.
        assert err(parse_json_object, '{"a" 1, "b": NaN}') == "JSON parse error, stray 'N'"

    def test_grammar_error_wins_over_later_lexical_error(self):
        assert err(parse_json_object, '{"a" 1} NaN') == (
            "JSON parse error, missing : in object pair"
        )


# ----------------------------------------------------------------------------- parse_option


class TestParseOption:
    def test_keyval(self):
        opt = parse_option("iothread,id=io0", "qom-type")
        assert opt == ParsedOption({"qom-type": "iothread", "id": "io0"}, from_json=False)
        assert opt.help is False

    def test_json(self):
        opt = parse_option('{"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}', "qom-type")
        assert opt.from_json is True
        assert opt.values == {"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}

    def test_json_ignores_implied_key(self):
        assert parse_option("{}", "driver").values == {}

    def test_leading_blank_means_keyval(self):
        assert err(parse_option, ' {"type":"x","id":"e","n":"d"}', "type") == (
            'Invalid parameter \'"id":"e"\''
        )

    def test_list_looking_text_is_keyval(self):
        assert parse_option("[1]", "type") == ParsedOption({"type": "[1]"}, False)

    def test_help(self):
        assert err(parse_option, "iothread,help", "qom-type") == (
            "Help is not available for this option"
        )
        opt = parse_option("iothread,help", "qom-type", allow_help=True)
        assert opt.help and opt.values == {"qom-type": "iothread"} and not opt.from_json

    def test_json_errors_propagate(self):
        assert err(parse_option, '{"a":1,"a":1}') == "JSON parse error, duplicate key"

    def test_full_qsd_command_line(self):
        bd = parse_option(
            "driver=file,node-name=disk0,filename=/img/a,,b.img,cache.direct=on", "driver"
        ).values
        assert bd == {
            "driver": "file",
            "node-name": "disk0",
            "filename": "/img/a,b.img",
            "cache": {"direct": "on"},
        }
        exp = parse_option(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=/s.sock,"
            "writable=on,num-queues=2,iothread.0=io0,iothread.1=io1",
            "type",
        )
        v = exp.values
        assert to_bool(v["writable"], "writable") is True
        assert to_int(v["num-queues"], "num-queues", "uint16") == 2
        assert to_str_list(v["iothread"], "iothread") == ["io0", "io1"]
        addr = to_dict(v["addr"], "addr")
        assert require(addr, "path", "addr") == "/s.sock"
        check_keys(addr, ["type", "path"], "addr")


# ----------------------------------------------------------------------------- to_bool


class TestToBool:
    @pytest.mark.parametrize("s", ["on", "yes", "true", "y"])
    def test_true(self, s):
        assert to_bool(s, "writable") is True

    @pytest.mark.parametrize("s", ["off", "no", "false", "n"])
    def test_false(self, s):
        assert to_bool(s, "writable") is False

    @pytest.mark.parametrize("s", ["ON", "True", "1", "0", "", " on", "on ", "maybe"])
    def test_bad_keyval(self, s):
        assert err(to_bool, s, "writable") == "Parameter 'writable' expects 'on' or 'off'"

    def test_nested_name(self):
        assert err(to_bool, "maybe", "addr.abstract") == (
            "Parameter 'addr.abstract' expects 'on' or 'off'"
        )

    @pytest.mark.parametrize("v", [{"x": "1"}, ["on"]])
    def test_keyval_container(self, v):
        assert err(to_bool, v, "writable") == "Parameters 'writable.*' are unexpected"

    def test_json(self):
        assert to_bool(True, "writable", from_json=True) is True
        assert to_bool(False, "writable", from_json=True) is False

    @pytest.mark.parametrize("v", ["on", "true", 1, 0, None, {}, []])
    def test_bad_json(self, v):
        assert err(to_bool, v, "writable", from_json=True) == (
            "Invalid parameter type for 'writable', expected: boolean"
        )


# ----------------------------------------------------------------------------- to_int


class TestToInt:
    @pytest.mark.parametrize(
        "s,value",
        [
            ("2", 2),
            ("0x2", 2),
            ("0X1f", 31),
            ("010", 8),  # base 0: octal
            ("0", 0),
            ("-0", 0),
            (" 2", 2),
            ("\t\n+2", 2),
            ("-5", -5),
            ("9223372036854775807", (1 << 63) - 1),
            ("-9223372036854775808", -(1 << 63)),
            ("-0x10", -16),
        ],
    )
    def test_int64(self, s, value):
        assert to_int(s, "n") == value

    @pytest.mark.parametrize(
        "s",
        ["", " ", "08", "2 ", "1k", "2.0", "0x", "0xg", "+-1", "--1", "x", "1e3", "0b1", "٣"],
    )
    def test_not_integer(self, s):
        assert err(to_int, s, "num-queues", "uint16") == "Parameter 'num-queues' expects integer"
        assert err(to_int, s, "n") == "Parameter 'n' expects integer"

    def test_int64_overflow(self):
        assert err(to_int, "9223372036854775808", "poll-max-ns") == (
            "Parameter 'poll-max-ns' expects integer"
        )
        assert err(to_int, "-9223372036854775809", "p") == "Parameter 'p' expects integer"

    def test_uint64(self):
        assert to_int("18446744073709551615", "u", "uint64") == U64
        assert to_int("-1", "u", "uint64") == U64  # strtoull wraps negatives
        assert to_int("-18446744073709551615", "u", "uint64") == 1
        assert err(to_int, "18446744073709551616", "u", "uint64") == (
            "Parameter 'u' expects integer"
        )

    @pytest.mark.parametrize(
        "type_,lo,hi",
        [
            ("int8", -128, 127),
            ("int16", -32768, 32767),
            ("int32", -(1 << 31), (1 << 31) - 1),
            ("uint8", 0, 255),
            ("uint16", 0, 65535),
            ("uint32", 0, (1 << 32) - 1),
        ],
    )
    def test_ranges(self, type_, lo, hi):
        assert to_int(str(lo), "x", type_) == lo
        assert to_int(str(hi), "x", type_) == hi
        assert err(to_int, str(hi + 1), "x", type_) == f"Parameter 'x' expects {type_}_t"
        assert err(to_int, str(lo - 1), "x", type_) == f"Parameter 'x' expects {type_}_t"

    def test_uint16_negative(self):
        assert err(to_int, "-1", "num-queues", "uint16") == (
            "Parameter 'num-queues' expects uint16_t"
        )
        assert to_int("-0", "num-queues", "uint16") == 0

    def test_keyval_container(self):
        assert err(to_int, {"a": "1"}, "num-queues", "uint16") == (
            "Parameters 'num-queues.*' are unexpected"
        )

    def test_unknown_type(self):
        with pytest.raises(ValueError, match="unknown integer type"):
            to_int("1", "x", "int128")

    def test_json_signed(self):
        assert to_int(-5, "p", from_json=True) == -5
        assert to_int(7, "p", "int32", from_json=True) == 7
        for bad in ["1", 1.0, True, None, [], {}, 1 << 63, 9.3e18]:
            assert err(to_int, bad, "poll-max-ns", from_json=True) == (
                "Invalid parameter type for 'poll-max-ns', expected: integer"
            )
        assert err(to_int, 1 << 31, "p", "int32", from_json=True) == (
            "Parameter 'p' expects int32_t"
        )

    def test_json_unsigned(self):
        assert to_int(2, "num-queues", "uint16", from_json=True) == 2
        assert to_int(U64, "u", "uint64", from_json=True) == U64
        assert to_int(-1, "u", "uint64", from_json=True) == U64
        for bad in ["2", 2.0, True, None, {}, U64 + 1, -(1 << 63) - 1]:
            assert err(to_int, bad, "num-queues", "uint16", from_json=True) == (
                "Parameter 'num-queues' expects uint64"
            )
        assert err(to_int, -1, "num-queues", "uint16", from_json=True) == (
            "Parameter 'num-queues' expects uint16_t"
        )
        assert err(to_int, 65536, "num-queues", "uint16", from_json=True) == (
            "Parameter 'num-queues' expects uint16_t"
        )


# ----------------------------------------------------------------------------- sizes


class TestSize:
    @pytest.mark.parametrize(
        "s,value",
        [
            ("512", 512),
            ("0", 0),
            ("010", 10),  # decimal, unlike integers
            ("4k", 4096),
            ("4K", 4096),
            ("4096b", 4096),
            ("4096B", 4096),
            ("1M", 1 << 20),
            ("1m", 1 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("15E", 15 << 60),
            ("0x1000", 4096),
            ("0X10", 16),
            ("0x1k", 1024),  # deprecated in QEMU, but accepted
            ("0.5k", 512),
            ("1.5k", 1536),
            ("3.k", 3072),
            ("1.k", 1024),
            ("0.1234m", 129394),
            ("1.0000000001k", 1024),
            ("0.00048828125k", 1),  # exactly 0.5 byte: rounds up
            ("0.00048828124k", 0),
            ("0.000732421875k", 1),
            ("512.0", 512),  # a zero fraction needs no suffix
            ("512.", 512),
            ("1.0b", 1),
            (" 512", 512),
            ("\t5", 5),
            ("  +3", 3),
            ("+512", 512),
            ("18446744073709551615", U64),
            ("1.5e", 3 << 59),  # 'e' here is the exabyte suffix
        ],
    )
    def test_valid(self, s, value):
        assert parse_size(s) == value
        assert to_size(s, "logical-block-size") == value

    @pytest.mark.parametrize(
        "s",
        [
            "",
            "k",
            "4KiB",
            "4kb",
            "1kk",
            "1 k",
            "512 ",
            "-512",
            " -5",
            "-0",
            "1.5",
            "1.5b",
            ".5k",
            "1e3",
            "1.0e3k",
            "1.5e5",
            "3..k",
            "7x",
            "1.5x",
            "0x",
            "0xk",
            "0x-5",
            "00x5",
            "0x0x5",
            "0x1.5k",
            "0x0.5k",
            "16E",
            "18446744073709551616",
            "0x10000000000000000",
            "0xfffffffffffffffffk",
        ],
    )
    def test_invalid(self, s):
        with pytest.raises(ValueError):
            parse_size(s)
        assert err(to_size, s, "logical-block-size") == (
            "Parameter 'logical-block-size' expects size"
        )

    def test_hex_suffix_warns(self, caplog):
        with caplog.at_level("WARNING", logger="pyvhost_blk.keyval"):
            assert parse_size("0x1k") == 1024
        assert "Using a multiplier suffix on hex numbers is deprecated: 0x1k" in caplog.text

    def test_keyval_container(self):
        assert err(to_size, ["1"], "s") == "Parameters 's.*' are unexpected"

    def test_json(self):
        assert to_size(4096, "logical-block-size", from_json=True) == 4096
        assert to_size(-512, "logical-block-size", from_json=True) == U64 - 511
        for bad in ["4k", "4096", 4096.0, True, None]:
            assert err(to_size, bad, "logical-block-size", from_json=True) == (
                "Parameter 'logical-block-size' expects uint64"
            )


# ----------------------------------------------------------------------------- strings


class TestStrings:
    def test_to_str(self):
        assert to_str("disk0", "node-name") == "disk0"
        assert to_str("", "node-name") == ""
        assert to_str("disk0", "node-name", from_json=True) == "disk0"

    @pytest.mark.parametrize("v", [{"x": "d"}, ["d"]])
    def test_to_str_keyval_container(self, v):
        assert err(to_str, v, "node-name") == "Parameters 'node-name.*' are unexpected"

    @pytest.mark.parametrize("v", [5, True, None, ["d"], {}])
    def test_to_str_json(self, v):
        assert err(to_str, v, "node-name", from_json=True) == (
            "Invalid parameter type for 'node-name', expected: string"
        )

    @pytest.mark.parametrize("from_json", [False, True])
    def test_to_str_list_single(self, from_json):
        assert to_str_list("io0", "iothread", from_json=from_json) == ["io0"]

    @pytest.mark.parametrize("from_json", [False, True])
    def test_to_str_list_list(self, from_json):
        assert to_str_list(["io0", "io1"], "iothread", from_json=from_json) == ["io0", "io1"]

    def test_to_str_list_from_parsed_options(self):
        kv = parse_option("iothread.0=a,iothread.1=b").values
        assert to_str_list(kv["iothread"], "iothread") == ["a", "b"]
        kv = parse_option("iothread=a").values
        assert to_str_list(kv["iothread"], "iothread") == ["a"]
        js = parse_option('{"iothread": ["a", "b"]}').values
        assert to_str_list(js["iothread"], "iothread", from_json=True) == ["a", "b"]
        assert to_str_list([], "iothread", from_json=True) == []

    def test_to_str_list_bad_element(self):
        assert err(to_str_list, ["a", {"x": "y"}], "iothread") == (
            "Parameters 'iothread.1.*' are unexpected"
        )
        assert err(to_str_list, ["a", 1], "iothread", from_json=True) == (
            "Invalid parameter type for 'iothread[1]', expected: string"
        )

    @pytest.mark.parametrize("from_json", [False, True])
    def test_to_str_list_bad(self, from_json):
        for v in [{"x": "y"}, 1, None]:
            assert err(to_str_list, v, "iothread", from_json=from_json) == (
                "Invalid parameter type for 'iothread', expected: string or array"
            )

    def test_to_dict(self):
        assert to_dict({"type": "unix"}, "addr") == {"type": "unix"}
        for v in ["foo", [1], None]:
            assert err(to_dict, v, "addr") == "Invalid parameter type for 'addr', expected: object"

    def test_child_name(self):
        assert child_name("", "addr") == "addr"
        assert child_name("addr", "path") == "addr.path"
        assert child_name("addr", "path", from_json=True) == "addr.path"
        assert child_name("iothread", 1) == "iothread.1"
        assert child_name("iothread", 1, from_json=True) == "iothread[1]"


# ----------------------------------------------------------------------------- schema checks


class TestSchema:
    def test_check_keys_ok(self):
        check_keys({"a": 1, "b": 2}, ["a", "b", "c"], "")
        check_keys({}, [], "")
        check_keys({"a": 1}, iter(["a"]))

    def test_check_keys_unexpected(self):
        assert err(check_keys, {"type": "x", "bogus": "1"}, ["type"], "") == (
            "Parameter 'bogus' is unexpected"
        )
        assert err(check_keys, {"bogus": {"x": "1"}}, ["type"]) == (
            "Parameter 'bogus' is unexpected"
        )

    def test_check_keys_nested(self):
        assert err(check_keys, {"type": "unix", "bogus": "1"}, ("type", "path"), "addr") == (
            "Parameter 'addr.bogus' is unexpected"
        )

    def test_check_keys_reports_first(self):
        assert err(check_keys, {"z": 1, "y": 2}, []) == "Parameter 'z' is unexpected"

    def test_require(self):
        assert require({"node-name": "d"}, "node-name") == "d"
        assert require({"x": None}, "x") is None
        assert err(require, {}, "node-name", "") == "Parameter 'node-name' is missing"
        assert err(require, {"type": "unix"}, "path", "addr") == "Parameter 'addr.path' is missing"


# ----------------------------------------------------------------------------- real qsd

QSD = shutil.which("qemu-storage-daemon")


@pytest.mark.parametrize(
    "arg,check",
    [
        ("iothread,id=x,a=1,a.b=2", lambda a: parse_option(a, "qom-type")),
        ("iothread,id=x,a.1=x", lambda a: parse_option(a, "qom-type")),
        ("iothread,id=x,a$b=x", lambda a: parse_option(a, "qom-type")),
        ("iothread,id=x,foo", lambda a: parse_option(a, "qom-type")),
        ("iothread,id=x,=x", lambda a: parse_option(a, "qom-type")),
        ('{"qom-type":"iothread","id":"x","id":"y"}', lambda a: parse_option(a, "qom-type")),
        ('{"qom-type":"iothread","id":"x",}', lambda a: parse_option(a, "qom-type")),
        ('{"qom-type":"iothread"} x', lambda a: parse_option(a, "qom-type")),
        (
            "iothread,id=x,poll-max-ns=9223372036854775808",
            lambda a: to_int(parse_option(a, "qom-type").values["poll-max-ns"], "poll-max-ns"),
        ),
        (
            '{"qom-type":"iothread","id":"x","poll-max-ns":"1"}',
            lambda a: to_int(parse_option(a).values["poll-max-ns"], "poll-max-ns", from_json=True),
        ),
        (
            "iothread,id=x,bogus=1",
            lambda a: check_keys(parse_option(a, "qom-type").values, ["qom-type", "id"]),
        ),
    ],
)
def test_matches_real_qsd(arg, check):
    if QSD is None:
        pytest.fail("qemu-storage-daemon not found: run scripts/install-deps.sh", pytrace=False)
    proc = subprocess.run(
        [QSD, "--object", arg], capture_output=True, text=True, timeout=20, check=False
    )
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    with pytest.raises(KeyvalError) as info:
        check(arg)
    assert first == f"qemu-storage-daemon: --object {arg}: {info.value}"
