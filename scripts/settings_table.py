"""Print the README's settings table from the settings dataclasses of every package."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

from flashrt_core.settings import describe_settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    print("| variable | default | meaning | package |")
    print("|---|---|---|---|")
    seen: set[str] = set()
    for path in sorted(ROOT.glob("packages/*/src/*/**/*settings*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = importlib.import_module(".".join(parts[parts.index("src") + 1 :]))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not dataclasses.is_dataclass(cls) or cls.__module__ != module.__name__:
                continue
            for env, default, doc in describe_settings(cls):
                if env in seen:
                    continue
                seen.add(env)
                shown = f"`{default}`" if default != "" else "(unset)"
                print(f"| `{env}` | {shown} | {doc} | {parts[1]} |")


if __name__ == "__main__":
    main()
