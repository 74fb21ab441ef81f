"""The network-volume cache: real tarballs, real worker processes, real mounts where allowed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core import Runtime, load_settings
from flashrt_core.builtin.volume_cache import VolumeCache, VolumeCachePlugin, VolumeLock
from flashrt_core.builtin.volume_settings import VolumeSettings
from flashrt_core.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

ENDPOINT = "ep-test1"


def settings(tmp_path: Path, cache: str = "cache-a", **overrides: Any) -> VolumeSettings:
    values: dict[str, Any] = {
        "volume_dir": tmp_path / "volume",
        "cache_dir": tmp_path / cache,
        "cache_lock_wait_s": 10.0,
        "cache_lock_stale_s": 60.0,
        "cache_persist_debounce_s": 0.05,
    }
    values.update(overrides)
    return VolumeSettings(**values)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def members(tarball: Path) -> dict[str, bytes | str]:
    """Regular files (content) and symlinks (target) of a tarball; fails if it is invalid."""
    out: dict[str, bytes | str] = {}
    with tarfile.open(tarball, "r:") as tar:
        for info in tar:
            if info.issym():
                out[info.name] = info.linkname
            elif info.isreg():
                handle = tar.extractfile(info)
                assert handle is not None
                out[info.name] = handle.read()
    return out


def cache_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "volume"
    path.mkdir()
    return path


def test_no_volume_is_a_silent_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flashrt")
    cache = VolumeCache(settings(tmp_path), ENDPOINT)
    write_files(cache.cache_dir, {"pip/x": b"1"})
    assert cache.hydrate().action == "skipped"
    assert cache.persist().action == "skipped"
    assert VolumeCache(settings(tmp_path), None).persist().reason == "RUNPOD_ENDPOINT_ID is not set"
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not (tmp_path / "volume").exists()


def test_persist_then_hydrate_restores_files_links_and_times(tmp_path: Path, volume: Path) -> None:
    a = VolumeCache(settings(tmp_path, "cache-a"), ENDPOINT)
    files = {"uv/archive-v0/abc/mod.py": b"print(1)\n", "pip/http-v2/a/b/c": os.urandom(5000)}
    write_files(a.cache_dir, files)
    os.symlink("archive-v0/abc", a.cache_dir / "uv" / "current")
    os.utime(a.cache_dir / "pip/http-v2/a/b/c", (1_600_000_000, 1_600_000_000))
    assert a.hydrate().reason == "no cache tarball on the volume yet"
    result = a.persist()
    assert (result.action, result.files) == ("persisted", 3)
    assert a.tarball == volume / ".cache" / f"cache-{ENDPOINT}.tar"
    stored = members(a.tarball)
    assert stored["uv/current"] == "archive-v0/abc"
    assert stored["pip/http-v2/a/b/c"] == files["pip/http-v2/a/b/c"]
    assert sorted(os.listdir(volume / ".cache")) == [a.tarball.name], "no lock or temp left"
    assert a.persist().reason == "no new cache files"

    b = VolumeCache(settings(tmp_path, "cache-b"), ENDPOINT)
    write_files(b.cache_dir, {"pip/http-v2/a/b/c": b"mine, newer"})
    result = b.hydrate()
    assert (result.action, result.files) == ("hydrated", 2)
    assert (b.cache_dir / "uv/archive-v0/abc/mod.py").read_bytes() == b"print(1)\n"
    assert (b.cache_dir / "uv/current/mod.py").read_bytes() == b"print(1)\n"
    assert (b.cache_dir / "pip/http-v2/a/b/c").read_bytes() == b"mine, newer", "never overwritten"
    assert [p.name for p in b.cache_dir.iterdir() if p.name.startswith(".")] == []
    a_stat = (a.cache_dir / "uv/archive-v0/abc/mod.py").stat()
    assert (b.cache_dir / "uv/archive-v0/abc/mod.py").stat().st_mtime == a_stat.st_mtime


WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from flashrt_core.builtin.volume_cache import VolumeCache
    from flashrt_core.builtin.volume_settings import VolumeSettings

    volume, cache, tag, go = sys.argv[1:5]
    vc = VolumeCache(
        VolumeSettings(volume_dir=Path(volume), cache_dir=Path(cache),
                       cache_lock_wait_s=60.0, cache_lock_stale_s=120.0),
        "ep-test1",
    )
    vc.hydrate()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.002)
    actions = []
    for rnd in range(2):
        folder = Path(cache) / "uv" / "archive-v0" / f"{tag}-{rnd}"
        folder.mkdir(parents=True)
        for i in range(15):
            (folder / f"f{i}.bin").write_bytes(os.urandom(64 * 1024) + tag.encode())
        if rnd == 1:  # the last round starts together in both workers
            open(go + "-" + tag, "w").close()
            while len([n for n in os.listdir(os.path.dirname(go)) if n.startswith("go-")]) < 2:
                time.sleep(0.001)
        actions.append(vc.persist().action)
    print(json.dumps(actions))
    """
)


def test_two_worker_processes_persisting_at_once_keep_both(tmp_path: Path, volume: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(volume), str(tmp_path / tag), tag, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("w1", "w2")
    ]
    try:
        time.sleep(0.5)  # both imported and waiting
        go.touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert json.loads(out) == ["persisted"] * 2
    tarball = volume / ".cache" / f"cache-{ENDPOINT}.tar"
    stored = members(tarball)
    expected = {
        f"uv/archive-v0/{tag}-{rnd}/f{i}.bin"
        for tag in ("w1", "w2")
        for rnd in range(2)
        for i in range(15)
    }
    assert set(stored) == expected
    assert all(data.endswith(name.split("/")[2][:2].encode()) for name, data in stored.items())
    assert sorted(os.listdir(volume / ".cache")) == [tarball.name]


def test_lock_waits_for_a_live_holder_and_breaks_a_stale_one(
    tmp_path: Path, volume: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = VolumeCache(settings(tmp_path, cache_lock_stale_s=30.0), ENDPOINT)
    write_files(cache.cache_dir, {"pip/one": b"1"})
    lock_path = volume / ".cache" / f"cache-{ENDPOINT}.tar.lock"
    lock_path.parent.mkdir()
    held = VolumeLock(lock_path, stale_s=30.0, wait_s=0)
    assert held.acquire()
    result = cache.persist(lock_wait_s=0.3)
    assert result.action == "failed" and "held by another worker" in (result.reason or "")
    assert held.owned(), "a live lock is left alone"
    held.release()
    assert not lock_path.exists()

    lock_path.write_text("12345 deadhost 0 token\n")
    an_hour_ago = time.time() - 3600
    os.utime(lock_path, (an_hour_ago, an_hour_ago))
    caplog.set_level(logging.WARNING, logger="flashrt")
    assert cache.persist(lock_wait_s=0.3).action == "persisted"
    assert "broke a stale volume cache lock" in caplog.text and "deadhost" in caplog.text
    assert set(members(cache.tarball)) == {"pip/one"}
    assert not lock_path.exists()


def test_corrupt_tarball_on_the_volume_is_refused_then_rewritten(
    tmp_path: Path, volume: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = VolumeCache(settings(tmp_path, "cache-a"), ENDPOINT)
    write_files(first.cache_dir, {f"pip/f{i}": os.urandom(20_000) for i in range(5)})
    first.persist()
    data = first.tarball.read_bytes()
    first.tarball.write_bytes(data[: len(data) // 2])  # damaged by something outside flashrt

    second = VolumeCache(settings(tmp_path, "cache-b"), ENDPOINT)
    write_files(second.cache_dir, {"uv/mine": b"local"})
    caplog.set_level(logging.WARNING, logger="flashrt")
    result = second.hydrate()
    assert result.action == "failed" and "truncated or corrupt" in (result.reason or "")
    assert cache_files(second.cache_dir) == {"uv/mine"}, "nothing half-restored"
    assert second.persist().action == "persisted"
    stored = members(second.tarball)
    assert "uv/mine" in stored
    assert {"pip/f0", "pip/f1"} <= set(stored), "members before the damage are kept"


def hostile_tarball(path: Path, outside: Path, case: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes = b"x", **attrs: Any) -> None:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = 0 if attrs else len(data)
            tar.addfile(info, None if attrs else io.BytesIO(data))

        add("pip/good", b"good")
        if case == "dotdot":
            add("../../outside/evil")
        elif case == "absolute":
            add(f"{outside}/evil")
        elif case == "symlink":
            add("pip/link", type=tarfile.SYMTYPE, linkname=str(outside))
            add("pip/link/evil")


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_hostile_tarball_on_the_volume_writes_nothing(
    tmp_path: Path, volume: Path, case: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = VolumeCache(settings(tmp_path), ENDPOINT)
    hostile_tarball(cache.tarball, outside, case)
    result = cache.hydrate()
    assert result.action == "failed", result
    assert list(outside.iterdir()) == []
    assert cache_files(cache.cache_dir) == set(), "refused whole: not even the good member"
    assert sorted(os.listdir(tmp_path)) == ["cache-a", "outside", "volume"]


def test_local_symlink_in_the_cache_is_not_followed_when_hydrating(
    tmp_path: Path, volume: Path
) -> None:
    source = VolumeCache(settings(tmp_path, "cache-a"), ENDPOINT)
    write_files(source.cache_dir, {"pip/x/file": b"data"})
    source.persist()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = VolumeCache(settings(tmp_path, "cache-b"), ENDPOINT)
    target.cache_dir.mkdir()
    os.symlink(outside, target.cache_dir / "pip")  # the worker's own cache points elsewhere
    assert target.hydrate().action == "hydrated"
    assert list(outside.iterdir()) == []


def test_size_cap_prunes_least_recently_used_entries(tmp_path: Path, volume: Path) -> None:
    vs = settings(tmp_path, cache_entry_depth=2, cache_max_bytes=3 * (1000 + 512))
    cache = VolumeCache(vs, ENDPOINT)
    for n, name in enumerate(["old", "older", "recent", "newest"]):
        write_files(cache.cache_dir, {f"pip/{name}/blob": os.urandom(1000)})
        used = {"older": 1_000, "old": 2_000, "recent": 3_000, "newest": 4_000}[name]
        os.utime(cache.cache_dir / f"pip/{name}/blob", (1_700_000_000 + used, 1_700_000_000 + n))
    assert cache.persist().action == "persisted"
    assert set(members(cache.tarball)) == {"pip/old/blob", "pip/recent/blob", "pip/newest/blob"}


def test_debounced_persist_coalesces_a_burst(tmp_path: Path, volume: Path) -> None:
    cache = VolumeCache(settings(tmp_path, cache_persist_debounce_s=0.2), ENDPOINT)
    calls = 0

    async def run_blocking(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def burst() -> None:
        waiters = []
        for i in range(5):
            write_files(cache.cache_dir, {f"pip/f{i}": b"x"})
            waiters.append(asyncio.ensure_future(cache.persist_soon(run_blocking)))
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*waiters), 10)

    asyncio.run(burst())
    assert calls == 1
    assert set(members(cache.tarball)) == {f"pip/f{i}" for i in range(5)}


# --- a read-only and a full volume: real mounts in a private mount namespace -----------------

MOUNTED = textwrap.dedent(
    """
    import json, logging, os, sys, io, tarfile
    from pathlib import Path
    from flashrt_core.builtin.volume_cache import VolumeCache
    from flashrt_core.builtin.volume_settings import VolumeSettings

    volume, cache, mode = sys.argv[1:4]
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append((record.levelname, record.getMessage()))
    logging.getLogger("flashrt").addHandler(handler)
    logging.getLogger("flashrt").setLevel(logging.INFO)
    vc = VolumeCache(VolumeSettings(volume_dir=Path(volume), cache_dir=Path(cache)), "ep-test1")
    for i in range(8):
        (Path(cache) / "pip").mkdir(parents=True, exist_ok=True)
        (Path(cache) / "pip" / f"f{i}").write_bytes(os.urandom(40_000))
    out = {"hydrate": vc.hydrate().action}
    out["first"] = vc.persist().action
    (Path(cache) / "pip" / "later").write_bytes(b"more")
    out["second"] = vc.persist().reason
    out["warnings"] = [m for level, m in records if level == "WARNING"]
    out["listing"] = sorted(os.listdir(Path(volume) / ".cache")) if mode == "full" else []
    out["restored"] = (Path(cache) / "uv" / "seed").read_bytes().decode() if mode == "ro" else ""
    print(json.dumps(out))
    """
)


def run_in_mount_namespace(tmp_path: Path, mode: str) -> dict[str, Any]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    vol = tmp_path / "volume"
    vol.mkdir(exist_ok=True)
    seed = tmp_path / "seed.tar"
    with tarfile.open(seed, "w") as tar:
        info = tarfile.TarInfo("uv/seed")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"seed"))
    setup = f"mount -t tmpfs -o size={'64k' if mode == 'full' else '1m'} tmpfs {vol}"
    setup += f" && mkdir {vol}/.cache && cp {seed} {vol}/.cache/cache-{ENDPOINT}.tar"
    if mode == "ro":
        setup += f" && mount -o remount,ro {vol}"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{setup} && echo mounted"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.strip()}")
    script = f'{setup} && exec {sys.executable} -c "$0" {vol} {tmp_path / "cache"} {mode}'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, MOUNTED],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_read_only_volume_warns_once_and_hydration_still_works(tmp_path: Path) -> None:
    out = run_in_mount_namespace(tmp_path, "ro")
    assert out["hydrate"] == "hydrated" and out["restored"] == "seed"
    assert out["first"] == "failed"
    assert "cannot be written" in out["second"]
    assert len(out["warnings"]) == 1 and "Read-only file system" in out["warnings"][0]


def test_full_volume_warns_once_and_leaves_the_old_tarball(tmp_path: Path) -> None:
    out = run_in_mount_namespace(tmp_path, "full")
    assert out["first"] == "failed"
    assert "cannot be written" in out["second"]
    assert len(out["warnings"]) == 1 and "No space left" in out["warnings"][0]
    assert out["listing"] == [f"cache-{ENDPOINT}.tar"], "no temp file or lock left behind"


# --- through the real Runtime ----------------------------------------------------------------


def test_runtime_hydrates_at_start_and_flushes_a_pending_persist_at_shutdown(
    tmp_path: Path, volume: Path
) -> None:
    seed = VolumeCache(settings(tmp_path, "cache-seed"), ENDPOINT)
    write_files(seed.cache_dir, {"uv/wheels/a.whl": b"wheel"})
    seed.persist()
    vs = settings(tmp_path, "cache-rt", cache_persist_debounce_s=30.0)
    plugin = VolumeCachePlugin(vs)

    async def main() -> None:
        runtime = Runtime(core_settings(), extra_plugins=(plugin,))
        await runtime.start()
        assert runtime.ready, runtime.startup_error
        assert (vs.cache_dir / "uv/wheels/a.whl").read_bytes() == b"wheel"
        write_files(vs.cache_dir, {"pip/new": b"installed"})
        for pending in runtime.pm.hook.flashrt_sync_cache(phase="persist", context=runtime.context):
            runtime.background(pending)
        await asyncio.sleep(0.05)
        assert plugin.cache is not None and plugin.cache.pending
        started = time.monotonic()
        await runtime.shutdown()
        assert time.monotonic() - started < 10, "shutdown flushes, it does not wait the debounce"

    asyncio.run(main())
    assert set(members(seed.tarball)) == {"uv/wheels/a.whl", "pip/new"}


def core_settings() -> Settings:
    """The built-in volume cache blocked: each test registers one made with its own settings."""
    return load_settings(
        Settings,
        {},
        disable_plugin_autoload=True,
        endpoint_id=ENDPOINT,
        blocked_plugins=("flashrt.volume-cache",),
    )


def test_unknown_phase_is_a_clear_error(tmp_path: Path) -> None:
    runtime = Runtime(core_settings(), extra_plugins=(VolumeCachePlugin(settings(tmp_path)),))
    with pytest.raises(ValueError, match="unknown sync_cache phase 'restore'"):
        runtime.pm.hook.flashrt_sync_cache(phase="restore", context=runtime.context)
