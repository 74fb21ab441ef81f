"""What the worker process reads of a request without parsing it: its time limit, and whether
the executor's fast lane can run it. The body itself travels untouched and is parsed once, in
the executor.

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

__all__ = ["Peeked", "is_simple", "peek_body", "peek_request"]


class _Fields(msgspec.Struct):
    timeout_s: float | None = None
    execution_type: str = "function"
    function_code: str | None = None
    class_code: str | None = None
    dependencies: list[Any] | None = None
    system_dependencies: list[Any] | None = None
    modules: dict[str, Any] | None = None
    instance_id: str | None = None


class _Envelope(_Fields):
    input: _Fields | None = None  # the queue's envelope


_json_fields = msgspec.json.Decoder(_Envelope)


class _Shape(msgspec.Struct, kw_only=True):
    """A FunctionRequest's fields with the client's types; the bulky ones stay raw JSON."""

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
    """The frame body and its form, the time limit to apply, whether it is simple, and the
    class instance it calls (the executor holding it must run it)."""

    body: bytes
    form: str
    timeout: float
    simple: bool
    instance: str | None = None


def _instance(get: Any) -> str | None:
    """The ``instance_id`` of a class request (a string), else ``None``."""
    if get("execution_type") != "class":
        return None
    instance = get("instance_id")
    return instance if isinstance(instance, str) else None


def is_simple(get: Any) -> bool:
    """Code to exec, nothing to install or mount: the executor's fast lane can run it.

    ``get`` reads a field by name: a mapping's ``get``, or an object's ``__getattribute__``.
    """
    is_function = get("execution_type") in (None, "function")
    code = get("function_code") if is_function else get("class_code")
    return bool(
        code and not get("dependencies") and not get("system_dependencies") and not get("modules")
    )


def peek_request(request: Any, settings: Settings) -> Peeked:
    """Encode ``request`` for an ``Execute`` frame; raises what ``msgspec`` raises for values it
    cannot encode."""
    limit = settings.timeout_s
    timeout: Any = None
    simple = False
    instance = None
    if isinstance(request, FunctionRequest):
        body, form, timeout = msgspec.msgpack.encode(request), "request", request.timeout_s
        simple = is_simple(request.__getattribute__)
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
            timeout, simple = source.timeout_s, is_simple(source.__getattribute__)
            instance = _instance(source.__getattribute__)
    else:
        body, form = msgspec.msgpack.encode(request), "msgpack"
        inner = request.get("input") if isinstance(request, dict) else None
        mapping = inner if isinstance(inner, dict) else request
        if hasattr(mapping, "get"):
            timeout, simple = mapping.get("timeout_s"), is_simple(mapping.get)
            instance = _instance(mapping.get)
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        limit = timeout
    return Peeked(body, form, min(limit, settings.max_timeout_s), simple, instance)


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
    timeout = shape.timeout_s
    limit = timeout if timeout is not None and timeout > 0 else settings.timeout_s
    get = shape.__getattribute__
    return Peeked(body, "json", min(limit, settings.max_timeout_s), is_simple(get), _instance(get))
