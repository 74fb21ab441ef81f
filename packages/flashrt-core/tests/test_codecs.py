"""Argument and result codecs: errors name the argument, values round-trip, sizes are capped."""

from __future__ import annotations

import base64
import datetime
import decimal
import fractions
import json
import math
import sys
from typing import Any

import cloudpickle
import msgspec
import pytest
from flashrt_core import StageError, encode_response
from flashrt_core.codecs import decode_arguments, decode_value, encode_result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

IDENTITY = "def ident(*args, **kwargs):\n    return [list(args), kwargs]\n"
ECHO = "def echo(x):\n    return x\n"


@pytest.fixture
def worker(module_worker: Any) -> Any:
    """One runtime for the module: its tests only send requests and read the answers."""
    return module_worker


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- errors name the argument --------------------------------------------------------------


def test_bad_base64_names_the_positional_argument(worker, wire):
    request = wire.function(IDENTITY, "ident", 1)
    request["args"].append("not*base64!")
    response = worker.execute(request)
    assert response.success is False
    assert response.error.startswith("args[1]: not valid base64")
    assert "failed during decode" in response.error


def test_unpicklable_keyword_names_the_keyword(worker, wire):
    request = wire.function(IDENTITY, "ident")
    request["kwargs"]["x"] = _b64(b"this is no pickle")
    response = worker.execute(request)
    assert response.success is False
    assert response.error.startswith("kwargs['x']: could not unpickle: ")
    assert "UnpicklingError" in response.error


def test_pickle_of_a_missing_module_names_module_and_argument(worker, wire):
    request = wire.function(IDENTITY, "ident")
    request["kwargs"]["model"] = _b64(b"cno_such_module_for_flashrt\nThing\n.")
    response = worker.execute(request)
    assert response.success is False
    assert response.error.startswith("kwargs['model']: could not unpickle: ModuleNotFoundError")
    assert "no_such_module_for_flashrt" in response.error


def test_non_string_argument_in_cloudpickle_format_is_named(worker, wire):
    request = wire.function(IDENTITY, "ident")
    request["args"] = [wire.enc(1), 2]
    response = worker.execute(request)
    assert response.success is False
    assert "args[1]: expected a base64 cloudpickle string, got int" in response.error


def test_constructor_arguments_are_named_as_such(worker, wire):
    request = wire.method(
        "class A:\n    def m(self):\n        return 1\n", "A", "m", ctor=((1,), {})
    )
    request["constructor_kwargs"] = {"size": "%%%"}
    response = worker.execute(request)
    assert response.success is False
    assert "constructor_kwargs['size']: not valid base64" in response.error


def test_unknown_serialization_format_is_refused(worker, wire):
    request = wire.function(ECHO, "echo", 1)
    request["serialization_format"] = "msgpack"
    response = worker.execute(request)
    assert response.success is False
    assert "serialization_format 'msgpack' is not supported" in response.error


def test_decode_value_direct():
    assert decode_value(_b64(cloudpickle.dumps({"a": 1})), "cloudpickle", "args[0]") == {"a": 1}
    assert decode_value([1, 2], "json", "args[0]") == [1, 2]
    with pytest.raises(StageError) as info:
        decode_value("@@", "cloudpickle", "kwargs['k']")
    assert info.value.stage == "decode"
    assert info.value.message == "kwargs['k']: not valid base64"


def test_decode_arguments_prefix():
    with pytest.raises(StageError, match=r"^constructor_args\[0\]: not valid base64"):
        decode_arguments(["%"], {}, "cloudpickle", prefix="constructor_")


# --- results that cannot be encoded -----------------------------------------------------------


def test_unpicklable_result_names_its_type_and_keeps_stdout(worker, wire):
    code = (
        "def make_lock():\n"
        "    import threading\n"
        "    print('made a lock')\n"
        "    return threading.Lock()\n"
    )
    response = worker.execute(wire.function(code, "make_lock"))
    assert response.success is False
    assert "result of type lock cannot be pickled" in response.error
    assert "failed during encode result" in response.error
    assert response.stdout == "made a lock\n"


def test_json_result_that_is_not_json_names_its_type(worker, wire):
    code = "def f():\n    print('here')\n    return object()\n"
    response = worker.execute(wire.json_function(code, "f"))
    assert response.success is False
    assert "result of type object is not JSON-serialisable" in response.error
    assert response.stdout == "here\n"


def test_dataclasses_defined_by_the_remote_code_reach_the_client(worker, wire, client, monkeypatch):
    code = (
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "    y: int\n"
        "    def norm2(self):\n"
        "        return self.x ** 2 + self.y ** 2\n"
        "def make(x, y):\n"
        "    from dataclasses import dataclass, field\n"
        "    @dataclass\n"
        "    class Box:\n"
        "        items: list = field(default_factory=list)\n"
        "    return Point(x, y), Box([x, y])\n"
    )
    response = worker.execute(wire.function(code, "make", 3, 4))
    # The client has none of the worker's modules: pickled by value, it still decodes.
    monkeypatch.delitem(sys.modules, "__flashrt_remote__", raising=False)
    point, box = client.decode(response)
    assert (point.x, point.y, point.norm2(), box.items) == (3, 4, 25, [3, 4])


# --- request size cap -------------------------------------------------------------------------


def test_request_bytes_over_the_cap_are_refused(make_worker, wire):
    worker = make_worker(max_request_bytes=2000)
    body = json.dumps(wire.function(ECHO, "echo", "x" * 3000)).encode()
    response = worker.execute(body)
    assert response.success is False
    assert "exceeds the limit of 2000" in response.error
    assert "failed during decode" in response.error


def test_parsed_request_over_the_cap_is_refused(make_worker, wire):
    worker = make_worker(max_request_bytes=2000)
    response = worker.execute(wire.function(ECHO, "echo", "x" * 3000))
    assert response.success is False
    assert "exceeds the limit of 2000" in response.error
    # Under the cap, the same worker serves.
    assert wire.dec(worker.execute(wire.function(ECHO, "echo", "x" * 100))) == "x" * 100


def test_large_arguments_and_results_round_trip(worker, wire):
    # Past the inline thresholds: decoded and encoded in the thread pool.
    blob = bytes(range(256)) * 1000
    items = list(range(5000))
    assert wire.dec(worker.execute(wire.function(ECHO, "echo", blob))) == blob
    assert wire.dec(worker.execute(wire.function(ECHO, "echo", items))) == items


# --- round trips (hypothesis) -----------------------------------------------------------------

HYPOTHESIS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
RUNTIME_HYPOTHESIS = settings(HYPOTHESIS, max_examples=60)
hashables = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.complex_numbers(allow_nan=False)
    | st.decimals(allow_nan=False)
    | st.fractions()
    | st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc))
    | st.dates()
)
picklable = st.recursive(
    hashables,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=15,
)
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=15,
)


@HYPOTHESIS
@given(value=picklable)
def test_picklable_values_round_trip_through_the_codec(value):
    result, json_result = encode_result(value, "cloudpickle")
    assert json_result is None
    assert decode_value(result, "cloudpickle", "args[0]") == value


@HYPOTHESIS
@given(value=json_like)
def test_json_values_round_trip_through_the_codec(value):
    result, json_result = encode_result(value, "json")
    assert result is None
    # The response travels as JSON: what the client parses equals what the function returned.
    from flashrt_core import FunctionResponse

    wire_form = encode_response(FunctionResponse(success=True, json_result=json_result))
    assert msgspec.json.decode(wire_form)["json_result"] == value
    assert decode_value(value, "json", "args[0]") == value


@RUNTIME_HYPOTHESIS
@given(args=st.lists(picklable, max_size=3), kwargs=st.dictionaries(st.text(), picklable))
def test_picklable_arguments_round_trip_through_the_runtime(worker, wire, args, kwargs):
    response = worker.execute(wire.function(IDENTITY, "ident", *args, **kwargs))
    assert wire.dec(response) == [args, kwargs]


@RUNTIME_HYPOTHESIS
@given(args=st.lists(json_like, max_size=3), kwargs=st.dictionaries(st.text(), json_like))
def test_json_arguments_round_trip_through_the_runtime(worker, wire, args, kwargs):
    response = worker.execute(json.dumps(wire.json_function(IDENTITY, "ident", *args, **kwargs)))
    assert response.result is None
    decoded = msgspec.json.decode(encode_response(response))
    assert decoded["json_result"] == [args, kwargs]


def test_functions_and_special_floats_round_trip():
    result, _ = encode_result(lambda x: x * 2, "cloudpickle")
    assert decode_value(result, "cloudpickle", "args[0]")(21) == 42
    result, _ = encode_result(
        [math.inf, -0.0, decimal.Decimal("1.5"), fractions.Fraction(1, 3)], "cloudpickle"
    )
    assert decode_value(result, "cloudpickle", "args[0]") == [
        math.inf,
        -0.0,
        decimal.Decimal("1.5"),
        fractions.Fraction(1, 3),
    ]
    nan = decode_value(encode_result(math.nan, "cloudpickle")[0], "cloudpickle", "args[0]")
    assert math.isnan(nan)
