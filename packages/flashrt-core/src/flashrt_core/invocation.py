"""What an executor hook gets: decoded arguments and the helpers to load and call code safely."""

from __future__ import annotations

import builtins
import hashlib
import inspect
import linecache
import sys
import time
import types
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .errors import StageError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import CodeType

    from .context import PluginContext
    from .lanes import Lanes
    from .protocol import FunctionRequest
    from .timing import Timings

__all__ = ["Invocation", "UserBaseException", "load_code"]

#: Namespace ``__name__`` of exec'd code. ``sys.modules`` holds only an empty placeholder under
#: this name: ``@dataclass`` and friends look the module up, while cloudpickle, finding nothing
#: the code defines in it, pickles those objects by value so the client needs no worker modules.
USER_MODULE_NAME = "__flashrt_remote__"
_USER_MODULE = types.ModuleType(USER_MODULE_NAME, "Placeholder module of code exec'd by flashrt.")
_CODE_CACHE_SIZE = 512
_code_cache: OrderedDict[str, CodeType] = OrderedDict()


class UserBaseException(Exception):
    """Carries a ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``...) out of user code.

    asyncio re-raises ``SystemExit`` and ``KeyboardInterrupt`` from tasks into the event loop,
    which would stop the worker; wrapped, it is just a failed request.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


def _compile(source: str, name: str) -> CodeType:
    code = _code_cache.get(source)
    if code is not None:
        try:  # noqa: SIM105 - a suppress() context costs more than the lookup
            _code_cache.move_to_end(source)
        except KeyError:  # the other lane's request evicted it meanwhile
            pass
        return code
    digest = hashlib.sha1(source.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    filename = f"<remote {name} {digest}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise StageError("load code", f"code for {name!r} does not compile: {exc}") from exc
    # Tracebacks through this code show its lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _code_cache[source] = code
    if len(_code_cache) > _CODE_CACHE_SIZE:
        _, evicted = _code_cache.popitem(last=False)
        # Keep linecache bounded with the code cache: a long-lived worker sees endless sources.
        linecache.cache.pop(evicted.co_filename, None)
    return code


def load_code(source: str, name: str) -> dict[str, Any]:
    """Exec ``source`` into a fresh namespace (compiled code is cached by source)."""
    code = _compile(source, name)
    sys.modules.setdefault(USER_MODULE_NAME, _USER_MODULE)
    namespace: dict[str, Any] = {"__name__": USER_MODULE_NAME, "__builtins__": builtins}
    try:
        exec(code, namespace)
    except BaseException as exc:
        raise StageError(
            "load code", f"running the code for {name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    return namespace


def _call_sync(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Runs in a worker thread: call, drain a generator there too, and wrap BaseExceptions."""
    try:
        result = fn(*args, **kwargs)
        if inspect.isgenerator(result):
            result = list(result)
        return result
    except Exception:
        raise
    except BaseException as exc:
        raise UserBaseException(exc) from exc


_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
#: Results that are surely neither awaitable nor an async generator (inspect's checks of those
#: go through the ABCs, a µs each).
_PLAIN_RESULTS = frozenset({int, float, bool, str, bytes, type(None), list, dict, tuple})


def _plain_sync(fn: Any) -> bool:
    """A plain ``def`` function or method, so surely not a coroutine or async generator
    function: what ``inspect`` would conclude, without its unwrapping."""
    func = fn.__func__ if type(fn) is types.MethodType else fn
    return (
        type(func) is types.FunctionType
        and not func.__code__.co_flags & _ASYNC_FLAGS
        and "_is_coroutine_marker" not in func.__dict__  # inspect.markcoroutinefunction
    )


async def _guard(awaitable: Any) -> Any:
    try:
        return await awaitable
    except Exception:
        raise
    except BaseException as exc:
        import asyncio

        if isinstance(exc, asyncio.CancelledError):
            raise
        raise UserBaseException(exc) from exc


async def _drain(agen: Any) -> list[Any]:
    return [item async for item in agen]


class Invocation:
    """The ``call`` argument of the executor hooks.

    ``lanes`` is where its code runs; ``context`` is the process's
    :class:`~flashrt_core.context.PluginContext`, the object the other hooks receive.
    """

    __slots__ = (
        "args",
        "constructor_args",
        "constructor_kwargs",
        "context",
        "kwargs",
        "lanes",
        "request",
        "timings",
    )

    def __init__(
        self,
        request: FunctionRequest,
        lanes: Lanes,
        args: list[Any],
        kwargs: dict[str, Any],
        constructor_args: list[Any] | None = None,
        constructor_kwargs: dict[str, Any] | None = None,
        *,
        context: PluginContext,
        timings: Timings | None = None,
    ) -> None:
        self.request = request
        self.lanes = lanes
        self.args = args
        self.kwargs = kwargs
        self.constructor_args = constructor_args or []
        self.constructor_kwargs = constructor_kwargs or {}
        self.context = context
        self.timings = timings

    def load_code(self, source: str, name: str) -> dict[str, Any]:
        """Exec ``source`` into a fresh namespace; failures are blamed on *load code*."""
        if self.timings is None or not self.timings.timed:
            return load_code(source, name)
        started = time.perf_counter()
        try:
            return load_code(source, name)
        finally:
            self.timings.moved("load", time.perf_counter() - started)

    async def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call user code the right way for its kind.

        Sync callables run off the event loop (the executor's main thread or a worker thread),
        coroutine functions are awaited, generators and async generators are collected into
        lists.
        """
        lanes = self.lanes
        if not _plain_sync(fn):
            if inspect.iscoroutinefunction(fn):
                return await _guard(fn(*args, **kwargs))
            if inspect.isasyncgenfunction(fn):
                return await _guard(_drain(fn(*args, **kwargs)))
        result = await lanes.run_user_sync(_call_sync, fn, args, kwargs)
        if type(result) in _PLAIN_RESULTS:
            return result
        if inspect.isawaitable(result):
            result = await _guard(result)
        elif inspect.isasyncgen(result):
            result = await _guard(_drain(result))
        return result
