"""Safe tar extraction and artifact unpacking: real tar files, real threads, the real Runtime."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import sys
import tarfile
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core import Runtime, load_settings
from flashrt_core.artifact import ArtifactOutcome, ArtifactUnpacker, add_app_dir_to_sys_path
from flashrt_core.builtin.artifact_startup import ArtifactPlugin
from flashrt_core.builtin.volume_settings import VolumeSettings
from flashrt_core.safetar import (
    ArchiveLimitError,
    CorruptArchiveError,
    ExtractLimits,
    UnsafeArchiveError,
    extract_replace,
)
from flashrt_core.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

LIMITS = ExtractLimits(max_members=1000, max_bytes=10 * 1024 * 1024)

Member = tuple[Any, ...]


def make_tar(path: Path, members: list[Member], mode: str = "w:gz") -> Path:
    """Write a tar whose members are given raw, so hostile names survive as they are."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for kind, name, *rest in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                data = rest[0]
                info.size = len(data)
                info.mode = rest[1] if len(rest) > 1 else 0o644
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, rest[0]
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, rest[0]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info)
    return path


def artifact_members() -> list[Member]:
    """What ``flash build`` produces, in miniature: ``./``-prefixed members."""
    return [
        ("dir", "."),
        ("file", "./flash_manifest.json", b'{"version": "1.0", "resources": {}}'),
        ("file", "./handler_calc.py", b"def handler(job):\n    return job\n"),
        ("dir", "./pkg"),
        ("file", "./pkg/__init__.py", b"VALUE = 42\n"),
        ("file", "./bin/tool", b"#!/bin/sh\necho hi\n", 0o4755),
        ("symlink", "./pkg/alias.py", "__init__.py"),
        ("hardlink", "./pkg/copy.py", "./pkg/__init__.py"),
    ]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
def space(tmp_path: Path) -> dict[str, Path]:
    """A work dir for the target and a sibling ``outside`` dir that must stay empty."""
    (tmp_path / "work").mkdir()
    (tmp_path / "outside").mkdir()
    return {"root": tmp_path, "work": tmp_path / "work", "outside": tmp_path / "outside"}


# --- safetar ---------------------------------------------------------------------------------


def test_extracts_a_flash_artifact_with_in_tree_links(space: dict[str, Path]) -> None:
    archive = make_tar(space["root"] / "a.tar.gz", artifact_members())
    dest = space["work"] / "app"
    report = extract_replace(archive, dest, LIMITS)
    assert (dest / "pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (dest / "pkg" / "alias.py").read_text() == "VALUE = 42\n"
    assert os.readlink(dest / "pkg" / "alias.py") == "__init__.py"
    assert (dest / "pkg" / "copy.py").stat().st_ino == (dest / "pkg" / "__init__.py").stat().st_ino
    mode = (dest / "bin" / "tool").stat().st_mode
    assert mode & 0o111 and not mode & 0o4000, "exec bit kept, setuid dropped"
    assert (dest / "handler_calc.py").stat().st_mtime == 1_700_000_000
    assert report.members == len(artifact_members())
    assert tree(space["work"]) == {"app", *(f"app/{p}" for p in tree(dest))}


HOSTILE: dict[str, list[Member]] = {
    "dotdot member": [("file", "../evil.txt", b"x")],
    "nested dotdot member": [("dir", "a"), ("file", "a/../../outside/evil.txt", b"x")],
    "absolute member": [("file", "{outside}/evil.txt", b"x")],
    "symlink to absolute dir, file written through it": [
        ("symlink", "link", "{outside}"),
        ("file", "link/evil.txt", b"x"),
    ],
    "symlink climbing out, file written through it": [
        ("symlink", "link", "../../outside"),
        ("file", "link/evil.txt", b"x"),
    ],
    "in-tree symlink used as a directory": [
        ("dir", "d"),
        ("symlink", "link", "d"),
        ("file", "link/evil.txt", b"x"),
    ],
    "symlink chain out through an in-tree link": [
        ("symlink", "c", "."),
        ("symlink", "a", "c/.."),
    ],
    "symlink replaced by a file of the same name": [
        ("symlink", "f", "x"),
        ("file", "f", b"x"),
    ],
    "hard link to an absolute path": [("hardlink", "h", "/etc/passwd")],
    "hard link climbing out": [("hardlink", "h", "../outside/x")],
    "hard link to a name not in the archive": [("hardlink", "h", "nowhere")],
    "character device": [("chr", "null")],
    "fifo": [("fifo", "pipe")],
    "root replaced by a symlink": [("symlink", ".", "{outside}")],
    "symlink over an implicit directory": [
        ("file", "a/b/c", b"x"),
        ("symlink", "a/b", "."),
    ],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_write_nothing_outside(
    space: dict[str, Path], case: str
) -> None:
    members = [
        tuple(str(v).format(outside=space["outside"]) if isinstance(v, str) else v for v in m)
        for m in HOSTILE[case]
    ]
    archive = make_tar(space["root"] / "evil.tar", members, mode="w")
    dest = space["work"] / "app"
    with pytest.raises(UnsafeArchiveError) as info:
        extract_replace(archive, dest, LIMITS)
    assert "evil.tar" in str(info.value)
    assert tree(space["outside"]) == set()
    assert tree(space["work"]) == set(), "no target, no temporary directory left behind"
    assert not (space["root"] / "evil.txt").exists()


def test_refused_archive_keeps_the_previous_target(space: dict[str, Path]) -> None:
    good = make_tar(space["root"] / "good.tar.gz", [("file", "keep.txt", b"v1")])
    dest = space["work"] / "app"
    extract_replace(good, dest, LIMITS)
    evil = make_tar(space["root"] / "evil.tar.gz", [("file", "new.txt", b"v2"), ("fifo", "p")])
    with pytest.raises(UnsafeArchiveError):
        extract_replace(evil, dest, LIMITS)
    assert tree(dest) == {"keep.txt"}
    v2 = make_tar(space["root"] / "v2.tar.gz", [("file", "new.txt", b"v2")])
    extract_replace(v2, dest, LIMITS)
    assert tree(dest) == {"new.txt"}, "a new version replaces the old one whole"
    assert tree(space["work"]) == {"app", "app/new.txt"}


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_truncated_archive_is_refused(space: dict[str, Path], mode: str) -> None:
    payload = os.urandom(256 * 1024)
    archive = make_tar(
        space["root"] / "t.tar", [("file", "a.bin", payload), ("file", "b.bin", payload)], mode
    )
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptArchiveError, match="truncated or corrupt"):
        extract_replace(archive, space["work"] / "app", LIMITS)
    assert tree(space["work"]) == set()


def test_caps_on_members_and_bytes(space: dict[str, Path]) -> None:
    many = make_tar(space["root"] / "many.tar", [("file", f"f{i}", b"x") for i in range(20)], "w")
    with pytest.raises(ArchiveLimitError, match="more than 10 members"):
        extract_replace(many, space["work"] / "app", ExtractLimits(10, 10**6))
    big = make_tar(space["root"] / "big.tar", [("file", "big", b"x" * 5000)], "w")
    with pytest.raises(ArchiveLimitError, match="more than 4096 bytes"):
        extract_replace(big, space["work"] / "app", ExtractLimits(10, 4096))
    assert tree(space["work"]) == set()


def test_not_a_tar_file(space: dict[str, Path]) -> None:
    bogus = space["root"] / "bogus.tar.gz"
    bogus.write_bytes(b"this is not an archive at all" * 10)
    with pytest.raises(CorruptArchiveError):
        extract_replace(bogus, space["work"] / "app", LIMITS)


# --- the unpacker ----------------------------------------------------------------------------


def unpacker(space: dict[str, Path], **options: Any) -> ArtifactUnpacker:
    options.setdefault("limits", LIMITS)
    return ArtifactUnpacker(space["root"] / "artifact.tar.gz", space["work"] / "app", **options)


def test_artifact_appearing_two_seconds_late_is_unpacked_on_a_retry(
    space: dict[str, Path],
) -> None:
    ready = make_tar(space["root"] / "built.tar.gz", artifact_members())
    u = unpacker(space, wait_s=8.0, backoff_s=0.2, max_backoff_s=0.5)
    timer = threading.Timer(2.0, os.replace, (ready, u.artifact))
    timer.start()
    try:
        outcome = u.unpack()
    finally:
        timer.cancel()
    assert outcome.status == "ready", outcome
    assert outcome.attempts > 1
    assert outcome.app_dir == space["work"] / "app"
    assert (outcome.app_dir / "handler_calc.py").is_file()


def test_artifact_never_appearing_fails_within_the_bound(space: dict[str, Path]) -> None:
    u = unpacker(space, wait_s=1.0, backoff_s=0.1, max_backoff_s=0.3)
    started = time.monotonic()
    outcome = u.unpack()
    elapsed = time.monotonic() - started
    assert outcome.status == "failed"
    assert "did not appear within 1 s" in (outcome.reason or "")
    assert outcome.app_dir is None
    assert elapsed < 1.0 + 0.5, f"reported after {elapsed:.2f} s, bound 1 s"
    assert u.outcome is outcome


def test_artifact_still_being_copied_is_retried_until_complete(space: dict[str, Path]) -> None:
    full = make_tar(space["root"] / "full.tar.gz", [("file", "big.bin", os.urandom(300_000))])
    u = unpacker(space, wait_s=5.0, backoff_s=0.1, max_backoff_s=0.2)
    data = full.read_bytes()
    u.artifact.write_bytes(data[: len(data) // 2])  # a copy in progress
    timer = threading.Timer(0.4, u.artifact.write_bytes, (data,))
    timer.start()
    try:
        outcome = u.unpack()
    finally:
        timer.join()
    assert outcome.status == "ready", outcome
    assert (space["work"] / "app" / "big.bin").stat().st_size == 300_000


def test_corrupt_artifact_that_does_not_change_fails_without_waiting_the_bound(
    space: dict[str, Path],
) -> None:
    u = unpacker(space, wait_s=30.0, backoff_s=0.1, max_backoff_s=0.2)
    u.artifact.write_bytes(b"\x1f\x8b garbage that will never become a tar")
    outcome = u.unpack()
    assert outcome.status == "failed"
    assert "truncated or corrupt" in (outcome.reason or "")
    assert outcome.attempts >= 2 and outcome.elapsed_s < 5


def test_unsafe_artifact_fails_at_once_with_the_reason(space: dict[str, Path]) -> None:
    u = unpacker(space, wait_s=30.0)
    make_tar(u.artifact, [("file", "./ok.py", b""), ("symlink", "./x", "/etc")])
    outcome = u.unpack()
    assert outcome.status == "failed" and outcome.attempts == 1
    assert "link to absolute path '/etc'" in (outcome.reason or "")
    assert tree(space["work"]) == set()


def test_unpack_is_idempotent_and_thread_safe(space: dict[str, Path]) -> None:
    u = unpacker(space, wait_s=2.0)
    make_tar(u.artifact, artifact_members())
    outcomes: list[ArtifactOutcome] = []
    threads = [threading.Thread(target=lambda: outcomes.append(u.unpack())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(outcomes) == 8
    assert all(o is outcomes[0] for o in outcomes), "one unpack, one shared outcome"
    assert outcomes[0].status == "ready" and outcomes[0].attempts == 1


def test_a_failure_does_not_stick(space: dict[str, Path]) -> None:
    """The reference set its retry flag before success: later calls silently did nothing."""
    u = unpacker(space, wait_s=0.2, backoff_s=0.05)
    assert u.unpack().status == "failed"
    make_tar(u.artifact, artifact_members())
    outcome = u.unpack()
    assert outcome.status == "ready"
    assert u.unpack() is outcome


def test_app_dir_goes_after_the_stdlib_and_before_site_packages(tmp_path: Path) -> None:
    saved = list(sys.path)
    try:
        add_app_dir_to_sys_path(tmp_path)
        add_app_dir_to_sys_path(tmp_path)
        index = sys.path.index(str(tmp_path))
        assert sys.path.count(str(tmp_path)) == 1
        stdlib = os.path.dirname(os.__file__)
        assert sys.path.index(stdlib) < index
        site = [i for i, p in enumerate(sys.path) if p.endswith("site-packages")]
        assert not site or index < min(site)
    finally:
        sys.path[:] = saved


# --- the start-up plugin through the real Runtime --------------------------------------------


def run_runtime(settings: Settings, volume: VolumeSettings, body: Any = None) -> Runtime:
    """Start a real Runtime (built-in plugins only, the artifact plugin made with ``volume``)
    with these settings, then run ``body``."""

    async def main() -> Runtime:
        runtime = Runtime(
            dataclasses.replace(settings, blocked_plugins=("flashrt.artifact",)),
            extra_plugins=(ArtifactPlugin(volume),),
        )
        try:
            if body is None:
                await runtime.start()
            else:
                await body(runtime)
        finally:
            await runtime.shutdown()
        return runtime

    return asyncio.run(main())


def deployed(space: dict[str, Path], **overrides: Any) -> tuple[Settings, VolumeSettings]:
    settings = load_settings(
        Settings,
        {},
        disable_plugin_autoload=True,
        resource_name="calc",
        artifact_path=space["root"] / "artifact.tar.gz",
    )
    volume = VolumeSettings(
        volume_dir=space["root"] / "no-volume",
        app_dir=space["work"] / "app",
        artifact_wait_s=overrides.get("wait_s", 5.0),
        artifact_backoff_s=0.05,
        artifact_max_backoff_s=0.1,
    )
    return settings, volume


def test_startup_plugin_unpacks_and_puts_the_app_on_sys_path(space: dict[str, Path]) -> None:
    settings, volume = deployed(space)
    make_tar(settings.artifact_path, artifact_members())
    saved = list(sys.path)
    try:
        runtime = run_runtime(settings, volume)
        outcome = runtime.context.artifact
        assert outcome is not None
        assert runtime.ready, runtime.startup_error
        assert outcome.status == "ready" and outcome.app_dir == volume.app_dir
        assert str(volume.app_dir) in sys.path
        assert outcome.to_dict()["app_dir"] == str(volume.app_dir)
    finally:
        sys.path[:] = saved


def test_startup_plugin_reports_failure_without_blocking_the_loop(space: dict[str, Path]) -> None:
    settings, volume = deployed(space, wait_s=1.0)
    ticks = 0
    seen: list[str] = []

    async def body(runtime: Runtime) -> None:
        nonlocal ticks
        start = asyncio.ensure_future(runtime.start())
        while not start.done():
            ticks += 1
            seen.append(getattr(runtime.context.artifact, "status", "absent"))
            await asyncio.sleep(0.05)

    runtime = run_runtime(settings, volume, body)
    assert not runtime.ready
    assert "did not appear within 1 s" in (runtime.startup_error or "")
    assert runtime.context.artifact is not None
    assert runtime.context.artifact.status == "failed"
    assert "pending" in seen, "the outcome is visible as pending while unpacking"
    assert ticks >= 10, f"the event loop ran only {ticks} times during a 1 s unpack"


def test_startup_plugin_declines_outside_deployed_mode(space: dict[str, Path]) -> None:
    settings = load_settings(Settings, {}, disable_plugin_autoload=True)
    _, volume = deployed(space)
    runtime = run_runtime(settings, volume)
    assert runtime.ready and runtime.context.artifact is None
    disabled = load_settings(
        Settings, {}, disable_plugin_autoload=True, resource_name="calc", disable_unpack=True
    )
    saved = list(sys.path)
    try:
        runtime = run_runtime(disabled, volume)
    finally:
        sys.path[:] = saved
    # Nothing unpacked: the app already in FLASHRT_APP_DIR is recorded as the one to serve.
    assert runtime.context.artifact is not None
    assert runtime.context.artifact.status == "ready"
    assert runtime.context.artifact.app_dir == volume.app_dir
    assert not volume.app_dir.exists()
