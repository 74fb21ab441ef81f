"""The docs promise completeness: every hook and argument, every setting, is documented."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
from flashrt_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = (ROOT / "docs" / "plugins.md").read_text()
README = (ROOT / "README.md").read_text()


def _hookspecs() -> list[tuple[str, list[str]]]:
    specs = []
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("flashrt_"):
            specs.append((name, list(inspect.signature(fn).parameters)))
    return specs


def test_there_are_hookspecs_to_check() -> None:
    names = {name for name, _ in _hookspecs()}
    assert {
        "flashrt_resolve_deps",
        "flashrt_execute_function",
        "flashrt_execute_class",
        "flashrt_sync_cache",
        "flashrt_reconcile_manifest",
    } <= names


def test_docs_describe_no_hook_that_does_not_exist() -> None:
    documented = set(re.findall(r"^#### `(flashrt_\w+)\(", PLUGINS_DOC, re.M))
    assert documented == {name for name, _ in _hookspecs()}


@pytest.mark.parametrize(("hook", "params"), _hookspecs())
def test_every_hook_and_argument_is_documented(hook: str, params: list[str]) -> None:
    heading = re.search(rf"^#### `{hook}\(([^)]*)\)`$", PLUGINS_DOC, re.M)
    assert heading, f"docs/plugins.md has no '#### `{hook}(...)`' section"
    assert [p.strip() for p in heading.group(1).split(",") if p.strip()] == params
    section = PLUGINS_DOC[heading.end() :].split("\n#### ", 1)[0]
    for param in params:
        assert re.search(rf"^- `{param}`: \S", section, re.M), f"{hook}: `{param}` undocumented"


def _settings_classes() -> list[type]:
    classes: list[type] = []
    for path in sorted(ROOT.glob("packages/*/src/*/**/*settings*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = importlib.import_module(".".join(parts[parts.index("src") + 1 :]))
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                dataclasses.is_dataclass(obj)
                and obj.__module__ == module.__name__
                and any("env" in f.metadata for f in dataclasses.fields(obj))
            ):
                classes.append(obj)
    return classes


def _settings_rows() -> list[tuple[str, str]]:
    rows = []
    for cls in _settings_classes():
        for field in dataclasses.fields(cls):
            if "env" in field.metadata:
                rows.append((f"{cls.__module__}.{cls.__name__}", field.metadata["env"]))
    return rows


def test_settings_are_found() -> None:
    owners = {owner for owner, _ in _settings_rows()}
    assert "flashrt_core.settings.Settings" in owners


@pytest.mark.parametrize(("owner", "env"), _settings_rows())
def test_every_setting_is_in_the_readme_table(owner: str, env: str) -> None:
    assert re.search(rf"^\| `{re.escape(env)}` \|", README, re.M), (
        f"{env} ({owner}) is missing from the README settings table"
    )


_SIDE_WORDS = {"both": "both processes", "worker": "the worker", "executor": "the executor"}


@pytest.mark.parametrize("name", sorted(hookspecs.SIDES))
def test_each_hook_says_which_process_runs_it(name: str) -> None:
    section = PLUGINS_DOC.split(f"#### `{name}(", 1)[1].split("\n####", 1)[0]
    match = re.search(r"\*\*Runs in:\*\* ([^.(,]+)", section)
    assert match is not None, f"{name}: no 'Runs in:' line in docs/plugins.md"
    assert match.group(1).strip().startswith(_SIDE_WORDS[hookspecs.SIDES[name]])


def test_every_hook_has_a_side() -> None:
    assert set(hookspecs.SIDES) == {name for name, _ in _hookspecs()}


def test_every_test_docs_contracts_names_exists() -> None:
    """docs/contracts.md names the tests that guard each contract and each defect of the replaced
    worker: a renamed or deleted test must take its mention along."""
    text = (ROOT / "docs" / "contracts.md").read_text()
    refs = re.findall(r"`((?:packages/[\w.-]+/)?tests/[\w/]+\.py)::(\w+)`", text)
    assert len(refs) >= 12, refs
    missing = [
        f"{path}::{name}"
        for path, name in refs
        if not (ROOT / path).is_file()
        or not re.search(rf"^(?:async )?def {name}\(", (ROOT / path).read_text(), re.M)
    ]
    assert not missing, f"docs/contracts.md names tests that do not exist: {missing}"
