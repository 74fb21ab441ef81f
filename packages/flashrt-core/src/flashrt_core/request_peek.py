"""What the worker process reads of a request without parsing it: its time limit, and the class
instance it calls. The body itself travels untouched and is parsed once, in the executor.

A shell that must refuse a bad body itself (the HTTP shell's 400 and 422) peeks with
:func:`peek_body`: it checks the request's shape, field types included, but leaves the large
values (arguments, module sources) as the raw JSON they are, uncopied.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from .protocol import FunctionRequest, RequestError, describe_invalid

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["Peeked", "peek_body", "peek_request"]


class _Fields(msgspec.Struct):
    timeout_s: float | None = None
    execution_type: str = "function"
    instance_id: str | None = None


class _Envelope(_Fields):
    input: _Fields | None = None  # the queue's envelope


_json_fields = msgspec.json.Decoder(_Envelope)


class _Shape(msgspec.Struct, kw_only=True):
    """A FunctionRequest's fields with the client's types; the bulky ones stay raw JSON.

    ``packages/flashrt-core/tests/test_request_peek.py`` holds it (and ``_Fields``) equal to
    ``FunctionRequest``: a field added there must be added here."""

    function_name: str | None = None
    function_code: str | None = None
    args: list[msgspec.Raw] = []
    kwargs: dict[str, msgspec.Raw] = {}
    dependencies: list[str] | None = None
    system_dependencies: list[str] | None = None
    modules: dict[str, msgspec.Raw] = {}
    execution_type: str = "function"
    class_name: str | None = None
    class_code: str | None = None
    constructor_args: list[msgspec.Raw] = []
    constructor_kwargs: dict[str, msgspec.Raw] = {}
    method_name: str = "__call__"
    instance_id: str | None = None
    create_new_instance: bool = True
    accelerate_downloads: bool = True
    serialization_format: str = "cloudpickle"
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        FunctionRequest.__post_init__(self)  # type: ignore[arg-type]  # the same two rules


class _ShapeEnvelope(msgspec.Struct):
    input: _Shape


_shape = msgspec.json.Decoder(_Shape, strict=False)
_shape_envelope = msgspec.json.Decoder(_ShapeEnvelope, strict=False)


class Peeked(NamedTuple):
    """The frame body and its form, the time limit to apply (``None``: none of ours), and the
    class instance it calls (the executor holding it must run it)."""

    body: bytes
    form: str
    timeout: float | None
    instance: str | None = None


def _instance(get: Any) -> str | None:
    """The ``instance_id`` of a class request (a string), else ``None``."""
    if get("execution_type") != "class":
        return None
    instance = get("instance_id")
    return instance if isinstance(instance, str) else None


def peek_request(request: Any, settings: Settings) -> Peeked:
    """Encode ``request`` for an ``Execute`` frame; raises what ``msgspec`` raises for values it
    cannot encode."""
    timeout: Any = None
    instance = None
    if isinstance(request, FunctionRequest):
        body, form, timeout = msgspec.msgpack.encode(request), "request", request.timeout_s
        instance = _instance(request.__getattribute__)
    elif isinstance(request, (bytes, bytearray, memoryview, str)):
        if isinstance(request, str):
            body = request.encode("utf-8", "surrogatepass")
        else:
            # A view (a queue job's raw input) travels as it is: no copy of a large body.
            body = request if isinstance(request, memoryview) else bytes(request)  # type: ignore[assignment]
        form = "json"
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            fields = _json_fields.decode(body)
            source = fields.input or fields
            timeout = source.timeout_s
            instance = _instance(source.__getattribute__)
    else:
        body, form = msgspec.msgpack.encode(request), "msgpack"
        inner = request.get("input") if isinstance(request, dict) else None
        mapping = inner if isinstance(inner, dict) else request
        if hasattr(mapping, "get"):
            timeout = mapping.get("timeout_s")
            instance = _instance(mapping.get)
    return Peeked(body, form, settings.time_limit(timeout), instance)


def peek_body(body: bytes, settings: Settings) -> Peeked:
    """Check a JSON body's shape and peek at it; raises :class:`RequestError` naming the field
    at fault (``malformed`` when it is not JSON at all)."""
    try:
        try:
            shape = _shape.decode(body)
        except msgspec.ValidationError as exc:
            try:  # maybe the queue's envelope
                shape = _shape_envelope.decode(body).input
            except msgspec.ValidationError:
                raise exc from None
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid request: {describe_invalid(exc)}") from None
    except msgspec.DecodeError as exc:
        raise RequestError(
            f"invalid request: body is not valid JSON ({exc})", malformed=True
        ) from None
    get = shape.__getattribute__
    limit = settings.time_limit(shape.timeout_s)
    return Peeked(body, "json", limit, _instance(get))
