"""Wire types, field for field the same as runpod_flash 1.21.0's pydantic models.

msgspec instead of pydantic: decoding a request is on every request's path and msgspec does it
in microseconds without importing pydantic into the worker.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "FunctionRequest",
    "FunctionResponse",
    "RequestError",
    "decode_request",
    "decode_response",
    "encode_response",
    "response_to_dict",
    "succeeded",
    "unwrap_input",
]


class RequestError(ValueError):
    """A request that cannot be decoded; the message names the offending field.

    ``malformed``: the body is not JSON at all (an HTTP 400, where a wrong shape is a 422).
    """

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


class FunctionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What the client asks the worker to run (docs/contracts.md, "The wire format").

    ``timeout_s`` is flashrt's only extension: unknown to the client, ignored by it, and optional.
    """

    function_name: str | None = None
    function_code: str | None = None
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    dependencies: list[str] | None = None
    system_dependencies: list[str] | None = None
    modules: dict[str, str] = msgspec.field(default_factory=dict)
    execution_type: str = "function"
    class_name: str | None = None
    class_code: str | None = None
    constructor_args: list[Any] = msgspec.field(default_factory=list)
    constructor_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    method_name: str = "__call__"
    instance_id: str | None = None
    create_new_instance: bool = True
    accelerate_downloads: bool = True
    serialization_format: str = "cloudpickle"
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        # The client's two validation rules, with its wording.
        if self.execution_type == "function" and self.function_name is None:
            raise ValueError('function_name is required when execution_type is "function"')
        if self.execution_type == "class" and self.class_name is None:
            raise ValueError('class_name is required when execution_type is "class"')


class FunctionResponse(msgspec.Struct, kw_only=True):
    """What the worker answers; every field the client model knows, nothing else."""

    success: bool
    result: str | None = None
    json_result: Any = None
    error: str | None = None
    stdout: str | None = None
    instance_id: str | None = None
    instance_info: dict[str, Any] | None = None


_json_decoder = msgspec.json.Decoder(FunctionRequest, strict=False)
_json_encoder = msgspec.json.Encoder()
_response_decoder = msgspec.json.Decoder(FunctionResponse)
#: How every response :func:`encode_response` makes as a success begins (a Struct's fields are
#: encoded in their order, ``success`` first, with no spaces).
_SUCCEEDED = b'{"success":true'


def unwrap_input(body: Any) -> Any:
    """Accept both the bare request and the queue's ``{"input": {...}}`` envelope."""
    if isinstance(body, dict) and isinstance(body.get("input"), dict) and len(body) <= 2:
        inner = body["input"]
        if "function_name" not in body and "execution_type" not in body:
            return inner
    return body


def decode_request(data: bytes | str | bytearray | memoryview | Any) -> FunctionRequest:
    """Decode JSON bytes/str or an already-parsed object into a request.

    Raises :class:`RequestError` whose message names the field at fault.
    """
    try:
        if isinstance(data, FunctionRequest):
            return data
        if isinstance(data, (bytes, bytearray, memoryview, str)):
            try:
                return _json_decoder.decode(data)
            except msgspec.ValidationError:
                # Maybe the queue envelope: parse loosely, then unwrap.
                parsed = msgspec.json.decode(data)
                return msgspec.convert(unwrap_input(parsed), FunctionRequest, strict=False)
        return msgspec.convert(unwrap_input(data), FunctionRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid request: {describe_invalid(exc)}") from None
    except msgspec.DecodeError as exc:
        raise RequestError(
            f"invalid request: body is not valid JSON ({exc})", malformed=True
        ) from None


def describe_invalid(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # msgspec says "... - at `$.function_name`"; say it the way a person reads it.
    if " - at `$." in text:
        message, _, where = text.rpartition(" - at `$.")
        return f"field {where.rstrip('`')!r}: {message}"
    if text.startswith("Expected `object`"):
        return f"a request must be a JSON object ({text})"
    return text


def encode_response(response: FunctionResponse) -> bytes:
    """JSON bytes the client's pydantic model accepts, whatever characters the user produced."""
    try:
        return _json_encoder.encode(response)
    except (UnicodeEncodeError, msgspec.EncodeError):
        return _json_encoder.encode(encodable_response(response))


def decode_response(data: bytes | memoryview) -> FunctionResponse:
    """The response :func:`encode_response` made; raises what ``msgspec`` raises otherwise."""
    response: FunctionResponse = _response_decoder.decode(data)
    return response


def succeeded(data: bytes) -> bool:
    """Whether a response's JSON from :func:`encode_response` is a success, without parsing it
    (a shell that passes the bytes on needs only this)."""
    return data.startswith(_SUCCEEDED)


def encodable_response(response: FunctionResponse) -> FunctionResponse:
    """A copy whose strings UTF-8 can carry: lone surrogates replaced, and a note in stdout."""
    from .capture import REPLACED_MARKER, encodable

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return value.encode("utf-8", "replace").decode("utf-8")
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        return value

    stdout = encodable(response.stdout) if response.stdout is not None else None
    fixed = FunctionResponse(
        success=response.success,
        result=clean(response.result),
        json_result=clean(response.json_result),
        error=clean(response.error),
        stdout=stdout,
        instance_id=clean(response.instance_id),
        instance_info=clean(response.instance_info),
    )
    if fixed.error != response.error or fixed.json_result != response.json_result:
        note = REPLACED_MARKER.format(count="some").lstrip("\n")
        fixed.stdout = (fixed.stdout or "") + note
    return fixed


def response_to_dict(response: FunctionResponse) -> dict[str, Any]:
    """Plain dict for transports that serialise on their own (the runpod SDK)."""
    out: dict[str, Any] = msgspec.structs.asdict(response)
    return out
