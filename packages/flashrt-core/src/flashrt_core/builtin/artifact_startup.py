"""Built-in plugin ``flashrt.artifact``: unpack the deployed app before the first request.

Active in deployed mode only (``FLASH_RESOURCE_NAME`` set). The unpack runs in the runtime's
thread pool, so ``/ping`` and the job loop stay responsive while the artifact is awaited. The
plugin is the one writer of the context's ``artifact``, an
:class:`~flashrt_core.artifact.ArtifactOutcome`: ``pending`` while it runs, then ``ready`` (the
app directory is on ``sys.path``) or ``failed`` with the reason, which is also raised so
start-up is marked failed with that reason; the worker keeps running and can report it. With
``FLASH_DISABLE_UNPACK`` nothing is unpacked: the app already in ``FLASHRT_APP_DIR`` is recorded
as ready (and put on ``sys.path``), so every reader finds the app's directory in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..hookspecs import hookimpl
from .volume_settings import VolumeSettingsOwner

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ..artifact import ArtifactOutcome, ArtifactUnpacker
    from ..context import PluginContext
    from .volume_settings import VolumeSettings

__all__ = ["ArtifactPlugin", "ensure_artifact"]


def _unpacker(context: PluginContext, volume: VolumeSettings) -> ArtifactUnpacker:
    from ..artifact import get_unpacker
    from ..safetar import ExtractLimits

    return get_unpacker(
        context.settings.artifact_path,
        volume.app_dir,
        wait_s=volume.artifact_wait_s,
        backoff_s=volume.artifact_backoff_s,
        max_backoff_s=volume.artifact_max_backoff_s,
        limits=ExtractLimits(
            max_members=volume.artifact_max_members, max_bytes=volume.artifact_max_bytes
        ),
    )


async def ensure_artifact(
    context: PluginContext, volume: VolumeSettings | None = None
) -> ArtifactOutcome:
    """Unpack (or reuse the earlier unpack), record the outcome on ``context``, raise if it
    failed (:class:`~flashrt_core.artifact.ArtifactError` with the reason).

    Safe to call again after a failure (a shell may retry later): a new bounded attempt starts.
    ``volume``: the settings of the unpack (default: the environment's).
    """
    from ..artifact import ArtifactError, ArtifactOutcome, add_app_dir_to_sys_path

    unpacker = _unpacker(context, volume or VolumeSettingsOwner().volume)
    current = unpacker.outcome
    if not current.ready:
        current = ArtifactOutcome(status="pending", artifact=unpacker.artifact)
    context.artifact = current
    outcome = await context.run_blocking(unpacker.unpack)
    context.artifact = outcome
    if outcome.status != "ready" or outcome.app_dir is None:
        raise ArtifactError(outcome.reason or "artifact unpack failed")
    add_app_dir_to_sys_path(outcome.app_dir)
    return outcome


class ArtifactPlugin(VolumeSettingsOwner):
    """``flashrt.artifact``; ``volume`` says where the app goes and how long to wait for it."""

    @hookimpl(trylast=True)
    def flashrt_startup(self, context: PluginContext) -> Awaitable[ArtifactOutcome] | None:
        """Unpack the artifact in deployed mode (or record the unpacked app); else decline."""
        settings = context.settings
        if not settings.resource_name:
            return None
        if settings.disable_unpack:
            from ..artifact import ArtifactOutcome, add_app_dir_to_sys_path

            app_dir = Path(self.volume.app_dir)
            add_app_dir_to_sys_path(app_dir)
            context.artifact = ArtifactOutcome(status="ready", app_dir=app_dir)
            return None
        return ensure_artifact(context, self.volume)
