"""What the supervisor reads of a request without parsing it: its time limit, and whether the
executor's fast lane can run it. The body itself travels untouched and is parsed once, in the
executor."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from .protocol import FunctionRequest

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["Peeked", "is_simple", "peek_request"]


class _Fields(msgspec.Struct):
    timeout_s: float | None = None
    execution_type: str = "function"
    function_code: str | None = None
    class_code: str | None = None
    dependencies: list[Any] | None = None
    system_dependencies: list[Any] | None = None
    modules: dict[str, Any] | None = None


class _Envelope(_Fields):
    input: _Fields | None = None  # the queue's envelope


_json_fields = msgspec.json.Decoder(_Envelope)


class Peeked(NamedTuple):
    """The frame body and its form, the time limit to apply, and whether it is simple."""

    body: bytes
    form: str
    timeout: float
    simple: bool


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
    if isinstance(request, FunctionRequest):
        body, form, timeout = msgspec.msgpack.encode(request), "request", request.timeout_s
        simple = is_simple(request.__getattribute__)
    elif isinstance(request, (bytes, bytearray, memoryview, str)):
        if isinstance(request, str):
            body = request.encode("utf-8", "surrogatepass")
        else:
            body = bytes(request)
        form = "json"
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            fields = _json_fields.decode(body)
            source = fields.input or fields
            timeout, simple = source.timeout_s, is_simple(source.__getattribute__)
    else:
        body, form = msgspec.msgpack.encode(request), "msgpack"
        inner = request.get("input") if isinstance(request, dict) else None
        mapping = inner if isinstance(inner, dict) else request
        if hasattr(mapping, "get"):
            timeout, simple = mapping.get("timeout_s"), is_simple(mapping.get)
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        limit = timeout
    return Peeked(body, form, min(limit, settings.max_timeout_s), simple)
