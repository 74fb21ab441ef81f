"""``request_peek``'s views of a request stay the wire's ``FunctionRequest``.

The HTTP shell checks a body's shape with ``_Shape`` (the client's fields and types, the bulky
values left as raw JSON) and reads the time limit and routing fields with ``_Fields``; both are
declared apart from ``FunctionRequest`` so that peeking never decodes the payload. These tests
fail the day a field is added to, renamed in or retyped in one and not the other.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from flashrt_core import request_peek
from flashrt_core.protocol import FunctionRequest, RequestError
from flashrt_core.settings import Settings, load_settings

#: The fields whose values the shape leaves undecoded: arguments and module sources.
BULKY = {"args", "kwargs", "modules", "constructor_args", "constructor_kwargs"}


def _fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return {field.name: field for field in info.fields}


def _raw_values(kind: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The type with its items (a list's, a dict's values) left as raw JSON."""
    if isinstance(kind, msgspec.inspect.ListType):
        return msgspec.inspect.ListType(msgspec.inspect.RawType())
    assert isinstance(kind, msgspec.inspect.DictType), kind
    return msgspec.inspect.DictType(kind.key_type, msgspec.inspect.RawType())


def _default(field: msgspec.inspect.Field) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


def test_the_shape_has_every_field_of_the_request_with_its_type_and_default() -> None:
    request = _fields(FunctionRequest)
    shape = _fields(request_peek._Shape)
    assert list(shape) == list(request)
    for name, field in request.items():
        expected = _raw_values(field.type) if name in BULKY else field.type
        assert shape[name].type == expected, name
        assert _default(shape[name]) == _default(field), name
        assert shape[name].required is field.required is False, name


def test_the_peeked_fields_are_the_requests_and_read_absent_as_its_defaults() -> None:
    request = _fields(FunctionRequest)
    for name, field in _fields(request_peek._Fields).items():
        assert name in request, f"{name} is not a FunctionRequest field"
        ours, theirs = _default(field), _default(request[name])
        # The peek tests the collections only for being empty (None stands for an empty one).
        assert ours == theirs or (not ours and not theirs), name


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"function_code": "def f(): pass"}', "function_name is required"),
        (b'{"execution_type": "class"}', "class_name is required"),
        (b'{"function_name": "f", "method_name": 3}', "method_name"),
        (b'{"function_name": "f", "args": "no"}', "args"),
    ],
)
def test_the_shape_refuses_what_the_request_refuses(body: bytes, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        msgspec.json.decode(body, type=FunctionRequest, strict=False)
    with pytest.raises(RequestError, match=names):
        request_peek.peek_body(body, load_settings(Settings, {}))
