"""Artifact unpacking, volume-cache hydrate/persist and manifest reads against stdlib floors.

The floors do the same I/O with nothing on top: ``tarfile.extractall(filter="data")`` for the
checked extractions, one ``tarfile`` write of the whole cache for a persist (which re-reads and
merges the volume's tarball under a lock), ``json.load`` of the file for a manifest read.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

FILES = 500
SIZE = 4096


def _best(fn: Any, rounds: int = 3) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def _make_tar(path: Path, mode: str, prefix: str = "./") -> None:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for i in range(FILES):
            info = tarfile.TarInfo(f"{prefix}pkg{i % 50}/mod{i}.py")
            data = (b"# %d\n" % i) * (SIZE // 8)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def _floor_extract(archive: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(archive, "r:*") as tar:
        kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, **kwargs)


def _artifact(work: Path) -> dict[str, Any]:
    from flashrt_core.safetar import ExtractLimits, extract_replace

    archive = work / "artifact.tar.gz"
    _make_tar(archive, "w:gz")
    limits = ExtractLimits(max_members=100_000, max_bytes=1 << 34)
    value = _best(lambda: extract_replace(archive, work / "app", limits))
    floor = _best(lambda: _floor_extract(archive, work / "floor"))
    return {
        "name": f"artifact unpack, {FILES} files (checked, fresh dir + swap)",
        "value": value * 1000,
        "unit": "ms",
        "floor": floor * 1000,
        "ratio": value / floor,
    }


def _cache(work: Path) -> list[dict[str, Any]]:
    from flashrt_core.builtin.volume_cache import VolumeCache
    from flashrt_core.builtin.volume_settings import VolumeSettings

    volume = work / "volume"
    (volume / ".cache").mkdir(parents=True)
    tarball = volume / ".cache" / "cache-bench.tar"
    _make_tar(tarball, "w", prefix="")

    def settings(cache: str) -> VolumeSettings:
        return VolumeSettings(volume_dir=volume, cache_dir=work / cache)

    def hydrate() -> None:
        shutil.rmtree(work / "hydrated", ignore_errors=True)
        result = VolumeCache(settings("hydrated"), "bench").hydrate()
        assert result.action == "hydrated", result

    hydrate_s = _best(hydrate)
    hydrate_floor = _best(lambda: _floor_extract(tarball, work / "floor-cache"))

    # A worker that restored the cache and then installed 100 new files persists them.
    def persist() -> None:
        cache = VolumeCache(settings("hydrated"), "bench")
        cache.hydrate()
        stamp = time.monotonic_ns()
        for i in range(100):
            new = work / "hydrated" / "new" / f"{stamp}-{i}.whl"
            new.parent.mkdir(parents=True, exist_ok=True)
            new.write_bytes(b"w" * SIZE)
        start = time.perf_counter()
        result = cache.persist()
        persist_times.append(time.perf_counter() - start)
        assert result.action == "persisted", result

    def persist_floor() -> None:
        with tarfile.open(work / "floor.tar", "w") as tar:
            tar.add(work / "hydrated", arcname=".")

    persist_times: list[float] = []
    for _ in range(3):
        persist()
    persist_s = min(persist_times)
    floor_s = _best(persist_floor)
    return [
        {
            "name": f"cache hydrate, {FILES} files (checked, staged, no-clobber)",
            "value": hydrate_s * 1000,
            "unit": "ms",
            "floor": hydrate_floor * 1000,
            "ratio": hydrate_s / hydrate_floor,
        },
        {
            "name": f"cache persist, +100 files into {FILES} (locked merge)",
            "value": persist_s * 1000,
            "unit": "ms",
            "floor": floor_s * 1000,
            "ratio": persist_s / floor_s,
        },
    ]


def _manifest(work: Path) -> dict[str, Any]:
    from flashrt_core.builtin.manifest import ManifestReconciler

    path = work / "flash_manifest.json"
    manifest = {"resources": {f"r{i}": {"functions": [{"name": f"f{i}"}]} for i in range(50)}}
    path.write_text(json.dumps(manifest))
    rec = ManifestReconciler(
        path, ttl_s=300, wait_s=1, backoff_s=1, max_backoff_s=1, fetch=lambda: manifest
    )
    n = 5000

    async def reads() -> None:
        for _ in range(n):
            await rec.get()

    def floor_reads() -> None:
        for _ in range(n):
            with open(path) as handle:
                json.load(handle)

    value = _best(lambda: asyncio.run(reads())) / n
    floor = _best(floor_reads) / n
    return {
        "name": "manifest read through the reconciler, fresh (per call)",
        "value": value * 1e6,
        "unit": "us",
        "floor": floor * 1e6,
        "ratio": value / floor,
    }


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="flashrt-bench-") as tmp:
        work = Path(tmp)
        rows = [_artifact(work)]
        rows += _cache(work)
        rows.append(_manifest(work))
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
