"""Argument and result codecs: base64 cloudpickle (the client's default) and plain JSON.

cloudpickle is imported on first use, not with the package.
"""

from __future__ import annotations

import base64
import binascii
import pickle
import sys
from typing import TYPE_CHECKING, Any

from .errors import StageError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FORMATS", "check_format", "decode_arguments", "decode_value", "encode_result"]

FORMATS = ("cloudpickle", "json")

# Results of these types are pickled inline; anything else may be large and is encoded off-loop.
SMALL_TYPES = (int, float, bool, type(None))
#: Exact types cloudpickle pickles exactly as the standard pickler does.
_ATOMIC = frozenset({int, float, bool, type(None), str, bytes})
_PROTOCOL = pickle.HIGHEST_PROTOCOL  # cloudpickle.DEFAULT_PROTOCOL


_modules: dict[str, Any] = {}

if sys.version_info >= (3, 11):

    def _b64decode(value: str) -> bytes:
        # What b64decode(validate=True) does, without its pure-Python argument handling.
        return binascii.a2b_base64(value, strict_mode=True)

else:

    def _b64decode(value: str) -> bytes:
        return base64.b64decode(value, validate=True)


def _cloudpickle() -> Any:
    """cloudpickle, imported once and then held here: a request that removes it from
    ``sys.modules`` still gets its own result encoded (and the executor replaced after)."""
    found = _modules.get("cloudpickle")
    if found is None:
        import cloudpickle

        found = _modules["cloudpickle"] = cloudpickle
    return found


def preload() -> None:
    """Import the codecs' libraries now (start-up), not during the first request."""
    _cloudpickle()


def check_format(fmt: str) -> None:
    """Refuse an unknown ``serialization_format`` before any work is done for the request."""
    if fmt not in FORMATS:
        raise StageError(
            "decode", f"serialization_format {fmt!r} is not supported (use 'cloudpickle' or 'json')"
        )


def decode_value(value: Any, fmt: str, where: str) -> Any:
    """Decode one argument; ``where`` (``args[1]``, ``kwargs['x']``) names it in errors."""
    if fmt == "json":
        return value
    return _unpickle(value, lambda: where)


def _unpickle(value: Any, where: Callable[[], str]) -> Any:
    """``where`` is only called for an error: building the name costs more than decoding."""
    if not isinstance(value, str):
        raise StageError(
            "decode",
            f"{where()}: expected a base64 cloudpickle string, got {type(value).__name__}",
        )
    try:
        raw = _b64decode(value)
    except (binascii.Error, ValueError):
        raise StageError("decode", f"{where()}: not valid base64") from None
    _cloudpickle()  # cloudpickle.loads is pickle.loads; what the data names needs cloudpickle
    try:
        return pickle.loads(raw)
    except Exception as exc:
        raise StageError(
            "decode", f"{where()}: could not unpickle: {type(exc).__name__}: {exc}"
        ) from exc


def decode_arguments(
    args: list[Any], kwargs: dict[str, Any], fmt: str, prefix: str = ""
) -> tuple[list[Any], dict[str, Any]]:
    """Decode a positional list and a keyword dict; ``prefix`` marks constructor arguments."""
    check_format(fmt)
    if fmt == "json":
        return list(args), dict(kwargs)
    out_args = [
        _unpickle(v, lambda i=i: f"{prefix}args[{i}]")  # type: ignore[misc]
        for i, v in enumerate(args)
    ]
    out_kwargs = {
        k: _unpickle(v, lambda k=k: f"{prefix}kwargs[{k!r}]")  # type: ignore[misc]
        for k, v in kwargs.items()
    }
    return out_args, out_kwargs


def encode_result(value: Any, fmt: str) -> tuple[str | None, Any]:
    """Return ``(result, json_result)`` for the response; raise at the *encode result* stage."""
    if fmt == "json":
        import msgspec

        try:
            msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise StageError(
                "encode result",
                f"result of type {type(value).__qualname__} is not JSON-serialisable: {exc}",
            ) from exc
        return None, value
    if type(value) in _ATOMIC:
        # cloudpickle's pickler gives these exact types to the C pickler unchanged: the same
        # bytes as plain pickle at cloudpickle's protocol, in a tenth of the time.
        return base64.b64encode(pickle.dumps(value, protocol=_PROTOCOL)).decode("ascii"), None
    cloudpickle = _cloudpickle()

    try:
        data = cloudpickle.dumps(value)
    except Exception as exc:
        raise StageError(
            "encode result",
            f"result of type {type(value).__qualname__} cannot be pickled: "
            f"{type(exc).__name__}: {exc}",
        ) from exc
    return base64.b64encode(data).decode("ascii"), None
