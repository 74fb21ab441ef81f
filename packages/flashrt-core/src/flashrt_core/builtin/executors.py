"""The default executors: exec the request's source, then call the function or method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import StageError
from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..instances import InstanceRegistry
    from ..invocation import Invocation
    from ..protocol import FunctionRequest


def _public_callables(namespace: dict[str, Any]) -> str:
    names = sorted(k for k, v in namespace.items() if not k.startswith("_") and callable(v))
    return ", ".join(names) or "nothing callable"


@hookimpl(trylast=True)
def flashrt_execute_function(request: FunctionRequest, call: Invocation) -> Awaitable[Any] | None:
    if request.function_code is None:
        return None
    return _run_function(request.function_code, request.function_name or "", call)


async def _run_function(source: str, name: str, call: Invocation) -> Any:
    namespace = call.load_code(source, name)
    fn = namespace.get(name)
    if fn is None or not callable(fn):
        raise StageError(
            "load code",
            f"function {name!r} not found in function_code; it defines: "
            f"{_public_callables(namespace)}",
        )
    return await call.call(fn, *call.args, **call.kwargs)


@hookimpl(trylast=True)
def flashrt_execute_class(
    request: FunctionRequest, call: Invocation, instances: InstanceRegistry
) -> Awaitable[Any] | None:
    if request.class_code is None:
        return None
    return _run_method(request, request.class_code, call, instances)


async def _run_method(
    request: FunctionRequest, source: str, call: Invocation, instances: InstanceRegistry
) -> Any:
    class_name = request.class_name or ""

    async def build() -> Any:
        namespace = call.load_code(source, class_name)
        cls = namespace.get(class_name)
        if not isinstance(cls, type):
            raise StageError(
                "load code",
                f"class {class_name!r} not found in class_code; it defines: "
                f"{_public_callables(namespace)}",
            )
        return await call.call(cls, *call.constructor_args, **call.constructor_kwargs)

    return await call_on_instance(request, call, instances, build)


async def call_on_instance(
    request: FunctionRequest,
    call: Invocation,
    instances: InstanceRegistry,
    build: Callable[[], Awaitable[Any]],
) -> Any:
    """Take the request's live instance (built with ``build`` when its id is unknown or
    ``create_new_instance`` asks for a new one), then call the requested method on it."""
    class_name = request.class_name or ""
    instance_id = request.instance_id or class_name
    entry = None if request.create_new_instance else instances.live(instance_id, class_name)
    if entry is None:
        entry = await instances.get_or_create(
            instance_id, build, class_name=class_name, replace=request.create_new_instance
        )
    return await call_method(entry.instance, request.method_name, call, entry.record_call)


async def call_method(instance: Any, method_name: str, call: Invocation, record: Any) -> Any:
    """Look up and call a method; a missing one is an error listing the public methods."""
    method = getattr(instance, method_name, None)
    if method is None or not callable(method):
        public = sorted(
            n
            for n in dir(type(instance))
            if not n.startswith("_") and callable(getattr(instance, n))
        )
        raise StageError(
            "call",
            f"{type(instance).__name__} has no method {method_name!r}; public methods: "
            f"{', '.join(public) or 'none'}",
        )
    record()
    return await call.call(method, *call.args, **call.kwargs)
