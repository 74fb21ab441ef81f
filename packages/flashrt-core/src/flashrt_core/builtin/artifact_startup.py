"""Built-in plugin ``flashrt.artifact``: unpack the deployed app before the first request.

Active in deployed mode only (``FLASH_RESOURCE_NAME`` set, ``FLASH_DISABLE_UNPACK`` not). The
unpack runs in the runtime's thread pool, so ``/ping`` and the job loop stay responsive while the
artifact is awaited. ``runtime.state["artifact"]`` holds an
:class:`~flashrt_core.artifact.ArtifactOutcome`: ``pending`` while it runs, then ``ready`` (the
app directory is on ``sys.path``) or ``failed`` with the reason, which is also raised so
start-up is marked failed with that reason; the worker keeps running and can report it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ..artifact import ArtifactUnpacker
    from ..runtime import Runtime

__all__ = ["STATE_KEY", "ensure_artifact", "flashrt_startup"]

#: ``runtime.state`` key of the :class:`~flashrt_core.artifact.ArtifactOutcome`.
STATE_KEY = "artifact"


def _unpacker(runtime: Runtime) -> ArtifactUnpacker:
    from ..artifact import get_unpacker
    from ..safetar import ExtractLimits
    from .volume_settings import volume_settings

    vs = volume_settings(runtime)
    return get_unpacker(
        runtime.settings.artifact_path,
        vs.app_dir,
        wait_s=vs.artifact_wait_s,
        backoff_s=vs.artifact_backoff_s,
        max_backoff_s=vs.artifact_max_backoff_s,
        limits=ExtractLimits(max_members=vs.artifact_max_members, max_bytes=vs.artifact_max_bytes),
    )


async def ensure_artifact(runtime: Runtime) -> None:
    """Unpack (or reuse the earlier unpack), record the outcome, raise if it failed.

    Safe to call again after a failure (a shell may retry later): a new bounded attempt starts.
    """
    from ..artifact import ArtifactError, ArtifactOutcome, add_app_dir_to_sys_path

    unpacker = _unpacker(runtime)
    current = unpacker.outcome
    if not current.ready:
        current = ArtifactOutcome(status="pending", artifact=unpacker.artifact)
    runtime.state[STATE_KEY] = current
    outcome = await runtime.run_blocking(unpacker.unpack)
    runtime.state[STATE_KEY] = outcome
    if outcome.status != "ready" or outcome.app_dir is None:
        raise ArtifactError(outcome.reason or "artifact unpack failed")
    add_app_dir_to_sys_path(outcome.app_dir)


@hookimpl(trylast=True)
def flashrt_startup(runtime: Runtime) -> Awaitable[None] | None:
    """Unpack the artifact in deployed mode; decline (``None``) otherwise."""
    settings = runtime.settings
    if not settings.resource_name or settings.disable_unpack:
        return None
    return ensure_artifact(runtime)
