"""The wire contract against runpod_flash's own pydantic models, and malformed input."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import msgspec
import pytest
from flashrt_core import FunctionRequest, FunctionResponse, decode_request, encode_response
from flashrt_core.protocol import RequestError, response_to_dict, unwrap_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: flashrt's one documented extension of the client's request model.
EXTENSIONS = {"timeout_s"}
FIXTURE_NAMES = ["01", "02", "03", "04", "05", "06", "07", "08"]
HYPOTHESIS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def worker(module_worker: Any) -> Any:
    """One runtime for the module: its tests only send requests and read the answers."""
    return module_worker


def _normalise(kind: Any) -> Any:
    """``Optional[List[str]]`` and ``list[str] | None`` compare equal."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = frozenset(_normalise(a) for a in typing.get_args(kind))
        return Any if Any in members else ("union", members)  # Optional[Any] is Any
    if origin is None:
        return kind
    return (origin, tuple(_normalise(a) for a in typing.get_args(kind)))


def _ours(cls: type[msgspec.Struct]) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for field in msgspec.structs.fields(cls):
        if field.default_factory is not msgspec.NODEFAULT:
            default = field.default_factory()
        elif field.default is msgspec.NODEFAULT:
            default = "<required>"
        else:
            default = field.default
        out[field.name] = (_normalise(hints[field.name]), default)
    return out


def _theirs(model: Any) -> dict[str, tuple[Any, Any]]:
    out = {}
    for name, info in model.model_fields.items():
        if info.default_factory is not None:
            default = info.default_factory()
        elif info.is_required():
            default = "<required>"
        else:
            default = info.default
        out[name] = (_normalise(info.annotation), default)
    return out


@pytest.mark.parametrize("name", ["FunctionRequest", "FunctionResponse"])
def test_fields_types_and_defaults_match_the_client_models(client, name):
    ours = _ours(globals()[name])
    theirs = _theirs(getattr(client.models, name))
    extension = EXTENSIONS if name == "FunctionRequest" else set()
    assert set(ours) - set(theirs) == extension
    assert set(theirs) <= set(ours)
    for field, spec in theirs.items():
        assert ours[field] == spec, field
    if extension:
        assert ours["timeout_s"] == (_normalise(float | None), None)


def _client_view(request: FunctionRequest) -> dict[str, Any]:
    values = msgspec.structs.asdict(request)
    for name in EXTENSIONS:
        values.pop(name)
    return values


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_body_decodes_to_the_same_values_in_both(client, fixture_bodies, name):
    for body in fixture_bodies(name):
        inner = unwrap_input(body)
        theirs = client.models.FunctionRequest(**inner).model_dump()
        from_dict = decode_request(body)
        from_bytes = decode_request(json.dumps(body).encode())
        from_str = decode_request(json.dumps(body))
        assert from_dict == from_bytes == from_str
        assert _client_view(from_dict) == theirs
        assert from_dict.timeout_s is None


def test_unknown_keys_are_ignored_by_both(client):
    body = {"function_name": "f", "a_future_field": {"x": 1}, "args": []}
    assert _client_view(decode_request(body)) == client.models.FunctionRequest(**body).model_dump()


@pytest.mark.parametrize(
    "body",
    [
        {"args": []},  # function_name missing
        {"execution_type": "class", "class_code": "class A: pass"},  # class_name missing
        {"function_name": "f", "args": "not a list"},
        {"function_name": "f", "kwargs": [1, 2]},
        {"function_name": 3},
        {"function_name": "f", "modules": {"a.py": 1}},
    ],
)
def test_both_models_reject_the_same_malformed_bodies(client, body):
    with pytest.raises(ValueError):
        client.models.FunctionRequest(**body)
    with pytest.raises(RequestError):
        decode_request(body)


def test_extension_field_timeout_s_decodes():
    assert decode_request({"function_name": "f", "timeout_s": 2.5}).timeout_s == 2.5


def test_queue_envelope_and_bare_body_decode_alike():
    bare = {"function_name": "f", "args": ["x"]}
    assert decode_request({"input": bare}) == decode_request(bare)
    assert decode_request(json.dumps({"input": bare}).encode()) == decode_request(bare)


@pytest.mark.parametrize(
    "response",
    [
        FunctionResponse(success=True, result="gAVLMi4=", stdout="hi\n"),
        FunctionResponse(success=True, json_result={"a": [1, 2.5, None]}),
        FunctionResponse(success=False, error="boom\ntraceback", stdout=""),
        FunctionResponse(
            success=True,
            result="gAVLRi4=",
            instance_id="Calc_1234abcd",
            instance_info={"class_name": "Calc", "method_calls": 3},
        ),
    ],
)
def test_encoded_response_is_accepted_by_the_client_model(client, response):
    theirs = client.models.FunctionResponse.model_validate_json(encode_response(response))
    assert theirs.model_dump() == msgspec.structs.asdict(response)
    assert client.models.FunctionResponse(**response_to_dict(response)) == theirs


# --- malformed requests through the runtime: an error response naming the field -------------


@pytest.mark.parametrize(
    ("request_", "names"),
    [
        (b"[1, 2, 3]", ["object"]),
        ("just a string", ["JSON"]),
        (b"42", ["object"]),
        (b"null", ["object"]),
        (b"{not json", ["JSON"]),
        ([1, 2], ["object"]),
        ({"args": []}, ["function_name"]),
        ({"input": {"args": []}}, ["function_name"]),
        ({"execution_type": "class", "class_code": "class A: pass"}, ["class_name"]),
        ({"function_name": 3}, ["function_name", "str"]),
        ({"function_name": "f", "args": "x"}, ["args", "array"]),
        ({"function_name": "f", "kwargs": [1]}, ["kwargs", "object"]),
        ({"function_name": "f", "create_new_instance": "maybe"}, ["create_new_instance"]),
        ({"function_name": "f", "dependencies": "numpy"}, ["dependencies"]),
        ({"function_name": "f", "modules": {"a.py": 1}}, ["modules"]),
        ({"function_name": "f", "timeout_s": "soon"}, ["timeout_s"]),
        ({"function_name": "f", "execution_type": "lambda"}, ["execution_type", "lambda"]),
        ({"function_name": "f", "serialization_format": "xml"}, ["serialization_format", "xml"]),
    ],
)
def test_malformed_request_gives_an_error_response_naming_the_field(worker, request_, names):
    response = worker.execute(request_)
    assert isinstance(response, FunctionResponse)
    assert response.success is False
    for name in names:
        assert name in response.error
    assert "failed during decode" in response.error


def test_runtime_keeps_serving_after_malformed_requests(worker, wire):
    for bad in (b"", b"\xff\xfe", {"function_name": None}, {"input": "x"}):
        assert worker.execute(bad).success is False
    ok = worker.execute(wire.function("def f():\n    return 7\n", "f"))
    assert wire.dec(ok) == 7


# --- hypothesis: arbitrary JSON in, a response out --------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
FIELDS = list(FunctionRequest.__struct_fields__)
request_like = st.dictionaries(st.sampled_from([*FIELDS, "input", "other"]), json_values)


@pytest.fixture
def fuzz_worker(make_worker: Any) -> Any:
    """One runtime for all of a test's hypothesis examples (function fixtures are not reset)."""
    return make_worker(timeout_s=2.0, max_instances=4, max_request_bytes=1 << 16)


@HYPOTHESIS
@given(body=json_values | request_like | st.builds(lambda d: {"input": d}, request_like))
def test_arbitrary_json_in_gives_a_response_out(fuzz_worker, body):
    for form in (body, json.dumps(body)):
        response = fuzz_worker.execute(form)
        assert isinstance(response, FunctionResponse)
        assert isinstance(response.success, bool)
        assert response.success or response.error
        # Whatever came in, the client's own model accepts what goes out.
        encode_response(response)


@HYPOTHESIS
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_in_gives_a_response_out(fuzz_worker, raw):
    response = fuzz_worker.execute(raw)
    assert isinstance(response, FunctionResponse)
    assert response.success or response.error


version_strings = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-=<>.", max_size=12)
well_typed = st.fixed_dictionaries(
    {"function_name": st.text(max_size=8)},
    optional={
        "function_code": st.none() | st.text(max_size=20),
        "args": st.lists(json_values, max_size=3),
        "kwargs": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        "dependencies": st.none() | st.lists(version_strings, max_size=3),
        "system_dependencies": st.none() | st.lists(version_strings, max_size=3),
        "modules": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
        "class_name": st.none() | st.text(max_size=8),
        "class_code": st.none() | st.text(max_size=8),
        "constructor_args": st.lists(json_values, max_size=2),
        "constructor_kwargs": st.dictionaries(st.text(max_size=5), json_values, max_size=2),
        "method_name": st.text(max_size=8),
        "instance_id": st.none() | st.text(max_size=8),
        "create_new_instance": st.booleans(),
        "accelerate_downloads": st.booleans(),
        "serialization_format": st.sampled_from(["cloudpickle", "json"]),
    },
)


@settings(max_examples=100, deadline=None)
@given(body=well_typed)
def test_well_typed_bodies_decode_to_the_same_values_in_both(client, body):
    theirs = client.models.FunctionRequest(**body).model_dump()
    assert _client_view(decode_request(body)) == theirs
    assert _client_view(decode_request(json.dumps(body).encode())) == theirs
