"""Run the benchmarks: every ``benchmarks/bench_*.py`` exposes ``run() -> list[dict]``.

Each row reports a measured value next to a floor measured in the same run, so the figure that
matters is the ratio, which survives a slower or busier machine.
``python benchmarks/run.py core lb`` runs only the named ones; results also go to
``.bench/results.json``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(module)
    return module


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


def main(argv: list[str]) -> int:
    wanted = set(argv)
    rows: list[dict[str, Any]] = []
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        area = path.stem.removeprefix("bench_")
        if wanted and area not in wanted:
            continue
        print(f"== {area}", flush=True)
        started = time.perf_counter()
        try:
            results = _load(path).run()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed.append(area)
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        for row in results:
            row.setdefault("area", area)
            rows.append(row)
            ratio = row.get("ratio")
            print(
                f"   {row['name']:<58} {_fmt(row.get('value')):>12} {row.get('unit', ''):<6}"
                f" floor {_fmt(row.get('floor')):>10}"
                + (f"  ratio {ratio:.2f}x" if isinstance(ratio, (int, float)) else ""),
                flush=True,
            )
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    out = HERE.parent / ".bench" / "results.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
