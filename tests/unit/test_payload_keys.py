"""Event payloads (sidecar/payload.py) and Redis keys / run ids (sidecar/keys.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import InvalidRunId, SidecarError
from sidecar.keys import Keys, RunId, new_run_id, validate_run_id
from sidecar.payload import fill_ids, parse_payload

# --- parse_payload ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("{}", {}),
        ("[]", []),
        ('  {"a":1}', {"a": 1}),
        ('\n\t\r [true, null, "x"]', [True, None, "x"]),
        ('{"a":1}  \n', {"a": 1}),
        ('{"a":{"b":[1,2.5,{"c":null}]}}', {"a": {"b": [1, 2.5, {"c": None}]}}),
        ('{"t":"héllo ✓ \\u00e9"}', {"t": "héllo ✓ é"}),
        (
            '{"message_type":"stop_reason","stop_reason":"end_turn"}',
            {
                "message_type": "stop_reason",
                "stop_reason": "end_turn",
            },
        ),
    ],
)
def test_parse_payload_json(data: str, expected: Any) -> None:
    assert parse_payload(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        None,
        "",
        "   ",
        "\n",
        "[DONE]",
        " [DONE]",
        "hello",
        "42",
        "-1",
        "1.5",
        '"a string"',
        "null",
        "true",
        "false",
        '{"a":',
        '{"a":1',
        '{"a":1} trailing',
        '{"a":1}{"b":2}',
        "[1,]",
        "{'a': 1}",
        '{"a": NaN}',
        '{"a": 1e400}',
        '{"a":"\\ud800"}',
        "[" * 2000 + "]" * 2000,
    ],
)
def test_parse_payload_not_json(data: str | None) -> None:
    assert parse_payload(data) is None


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=10,
    ).filter(lambda v: isinstance(v, (list, dict))),
    st.sampled_from(["", " ", "\n", "\t "]),
)
def test_parse_payload_roundtrip(value: Any, pad: str) -> None:
    assert parse_payload(pad + json.dumps(value) + pad) == value


# --- fill_ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            '{"message_type":"assistant_message"}',
            {"message_type": "assistant_message", "seq_id": 7, "run_id": "run-1"},
            id="both-missing",
        ),
        pytest.param(
            '{"seq_id": null, "run_id": null}',
            {"seq_id": 7, "run_id": "run-1"},
            id="both-null",
        ),
        pytest.param(
            '{"seq_id": null, "run_id": "upstream-run"}',
            {"seq_id": 7, "run_id": "upstream-run"},
            id="seq-null",
        ),
        pytest.param(
            '{"run_id": "upstream-run"}',
            {"run_id": "upstream-run", "seq_id": 7},
            id="seq-missing",
        ),
        pytest.param(
            '{"seq_id": 7, "run_id": null}',
            {"seq_id": 7, "run_id": "run-1"},
            id="run-null",
        ),
        pytest.param(
            '{"seq_id": 7}',
            {"seq_id": 7, "run_id": "run-1"},
            id="run-missing",
        ),
        # The upstream's own numbering is not the replay cursor: the seq replaces it.
        pytest.param(
            '{"seq_id": 99, "run_id": "upstream-run"}',
            {"seq_id": 7, "run_id": "upstream-run"},
            id="seq-other-number",
        ),
        pytest.param('{"seq_id": 6, "run_id": "r"}', {"seq_id": 7, "run_id": "r"}, id="0-based"),
        pytest.param('{"seq_id": "7", "run_id": "r"}', {"seq_id": 7, "run_id": "r"}, id="string"),
        pytest.param('{"seq_id": 7.0, "run_id": "r"}', {"seq_id": 7, "run_id": "r"}, id="float"),
        pytest.param(
            '{"message":{"seq_id":null,"run_id":null}}',
            {"message": {"seq_id": None, "run_id": None}, "seq_id": 7, "run_id": "run-1"},
            id="nested-untouched",
        ),
    ],
)
def test_fill_ids_fills(data: str, expected: dict[str, Any]) -> None:
    out = fill_ids(data, parse_payload(data), 7, "run-1")
    assert json.loads(out) == expected
    assert "\n" not in out


def test_fill_ids_exact_output_keeps_key_order() -> None:
    data = '{"seq_id": null, "a": 1, "b": [1, 2]}'
    assert (
        fill_ids(data, parse_payload(data), 5, "r") == '{"seq_id":5,"a":1,"b":[1,2],"run_id":"r"}'
    )


@pytest.mark.parametrize(
    "data",
    [
        '{ "run_id" : "orig",  "seq_id" : 7, "x": 1.50, "y": "\\u00e9" }',
        '{"seq_id": 7, "run_id": ""}',
        '{"seq_id": 7, "run_id": 5}',
        '{"seq_id": 7, "run_id": []}',
        '\n  {"seq_id":7,"run_id":"a","seq":null}  ',
    ],
)
def test_fill_ids_keeps_exact_bytes_when_the_ids_are_right(data: str) -> None:
    assert fill_ids(data, parse_payload(data), 7, "run-1") == data


@pytest.mark.parametrize(
    "data",
    ["[DONE]", "plain text", '[{"seq_id": null}]', "[]", "", '"s"', "42"],
)
def test_fill_ids_leaves_non_objects_alone(data: str) -> None:
    assert fill_ids(data, parse_payload(data), 7, "run-1") == data


@pytest.mark.parametrize("payload", [None, [], [{"seq_id": None}], "text", 3])
def test_fill_ids_ignores_non_dict_payloads(payload: Any) -> None:
    assert fill_ids("raw data", payload, 7, "run-1") == "raw data"


@given(
    st.dictionaries(
        st.sampled_from(["seq_id", "run_id", "a", "b", "message_type"]),
        st.none() | st.integers(-5, 5) | st.text(max_size=5),
        max_size=5,
    ),
    st.integers(1, 10**9),
)
def test_fill_ids_property(obj: dict[str, Any], seq: int) -> None:
    data = json.dumps(obj)
    out = fill_ids(data, parse_payload(data), seq, "run-x")
    result = json.loads(out)
    assert result["seq_id"] == seq
    assert type(result["seq_id"]) is int
    assert result["run_id"] == ("run-x" if obj.get("run_id") is None else obj["run_id"])
    assert {k: v for k, v in result.items() if k not in ("seq_id", "run_id")} == {
        k: v for k, v in obj.items() if k not in ("seq_id", "run_id")
    }
    if obj.get("seq_id") == seq and type(obj["seq_id"]) is int and obj.get("run_id") is not None:
        assert out == data


# --- run ids ---------------------------------------------------------------------------------

ALL_ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "Z",
        "0",
        ".",
        "_",
        ":",
        "-",
        "run-42",
        "run-3f2b9c1e-8d4a-4c7e-9a1b-0e5f6d7c8b9a",
        "agent.1:step_2-x",
        ALL_ALLOWED,
        "x" * 128,
        ("a1._:-" * 22)[:128],
    ],
)
def test_valid_run_ids(value: str) -> None:
    assert validate_run_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "run 42",
        " run",
        "run ",
        "a/b",
        "/",
        "a\\b",
        "{run}",
        "run}",
        "{",
        "run\n",
        "\nrun",
        "run\r",
        "a\tb",
        "a\x00b",
        "rün",
        "\uff52un",  # fullwidth r
        "\u0661\u0662\u0663",  # Arabic-Indic digits
        "run*",
        "*",
        "run?",
        "run[1]",
        "a,b",
        "a;b",
        "a@b",
        "a#b",
        "a%20b",
        "a+b",
        "x" * 129,
        "x" * 128 + "\n",
        ALL_ALLOWED + "!",
    ],
)
def test_invalid_run_ids(value: str) -> None:
    with pytest.raises(InvalidRunId) as info:
        validate_run_id(value)
    assert info.value.run_id == value


def test_invalid_run_id_is_a_value_error_and_a_sidecar_error() -> None:
    with pytest.raises(ValueError, match="invalid run id 'a/b'"):
        validate_run_id("a/b")
    assert issubclass(InvalidRunId, SidecarError)
    assert issubclass(InvalidRunId, ValueError)


@pytest.mark.parametrize("value", ["y" * 129, "z" * 100_000, "bad/" * 5000])
def test_invalid_run_id_message_does_not_echo_a_long_id(value: str) -> None:
    with pytest.raises(InvalidRunId) as info:
        validate_run_id(value)
    message = str(info.value)
    assert value not in message
    assert len(message) < 200
    assert message.startswith("invalid run id ")


def test_new_run_id_is_valid_and_unique() -> None:
    ids = [new_run_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for run_id in ids:
        assert validate_run_id(run_id) == run_id


# --- keys ------------------------------------------------------------------------------------


def test_default_keys_match_design_example() -> None:
    keys = Keys()
    assert keys.prefix == "sse:run:"
    run_id = validate_run_id("run-42")
    assert keys.stream(run_id) == "sse:run:{run-42}"
    assert keys.meta(run_id) == "sse:run:{run-42}:meta"


def test_explicit_default_prefix() -> None:
    keys = Keys("sse:run:")
    assert keys.stream(RunId("run-42")) == "sse:run:{run-42}"
    assert keys.meta(RunId("run-42")) == "sse:run:{run-42}:meta"


@pytest.mark.parametrize(
    ("prefix", "stream", "meta"),
    [
        ("letta:stream:", "letta:stream:{abc}", "letta:stream:{abc}:meta"),
        ("", "{abc}", "{abc}:meta"),
        ("x", "x{abc}", "x{abc}:meta"),
    ],
)
def test_custom_prefix(prefix: str, stream: str, meta: str) -> None:
    keys = Keys(prefix=prefix)
    run_id = validate_run_id("abc")
    assert keys.stream(run_id) == stream
    assert keys.meta(run_id) == meta


def test_both_keys_of_a_run_share_one_hash_tag() -> None:
    keys = Keys()
    run_id = new_run_id()

    def hash_tag(key: str) -> str:
        start = key.index("{")
        return key[start + 1 : key.index("}", start)]

    assert hash_tag(keys.stream(run_id)) == run_id
    assert hash_tag(keys.meta(run_id)) == run_id
    assert keys.meta(run_id) == keys.stream(run_id) + ":meta"


@given(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.booleans(),
    st.sampled_from(("null", '"r"', None)),
)
def test_fill_ids_keeps_integers_orjson_cannot_hold_exactly(
    big: int, nested: bool, run_id: str | None
) -> None:
    """orjson reads integers past 64 bits as floats: a payload holding one is rewritten with the
    stdlib, and every integer keeps its exact value (found or not by the float pre-check)."""
    value = f'{{"deep": [{big}]}}' if nested else str(big)
    fields = [f'"n": {value}', '"seq_id": 0']
    if run_id is not None:
        fields.append(f'"run_id": {run_id}')
    data = "{" + ", ".join(fields) + "}"
    out = json.loads(fill_ids(data, parse_payload(data), 7, "run-x"))
    assert out["n"] == json.loads(value)
    assert out["seq_id"] == 7
    assert out["run_id"] == ("r" if run_id == '"r"' else "run-x")
