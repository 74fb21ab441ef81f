"""ARCHITECTURE.md promises a true map: its codemap, its import rules and the tests it names.

Like ``tests/test_docs.py`` for ``docs/plugins.md``. Everything here reads source with ``ast``;
no package is imported.

* every module the codemap names exists, and every module of every package's ``src/`` is named;
* no module imports what its codemap line (or its package's line) says it never imports;
* every test the invariants section names exists, and every invariant names one;
* ``flashrt_core``'s import graph has no cycle, counting every import: those inside functions
  (they run too) and those under ``if TYPE_CHECKING:`` (a type name one layer needs from
  another is a dependency all the same; a cycle of them is a knot a reader has to untie).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = (ROOT / "ARCHITECTURE.md").read_text()

_ENTRY = re.compile(r"^- `(flashrt_\w+(?:\.\w+)*)` — (.*)$", re.M)
_NEVER = re.compile(r"\*\*Never imports:\*\*(.*)$")
_TEST_REF = re.compile(r"`((?:packages/[\w.-]+/)?tests/[\w/.-]+\.py)::(\w+)(?:::(\w+))?`")


def _section(title: str) -> str:
    parts = re.split(rf"^## {re.escape(title)}\s*$", ARCHITECTURE, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"ARCHITECTURE.md has no '## {title}' section"
    return re.split(r"^## ", parts[1], maxsplit=1, flags=re.M)[0]


# --- the packages' modules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _package_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for src in sorted(ROOT.glob("packages/*/src")):
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            modules[name] = Module(name, path, is_package)
    return modules


MODULES = _package_modules()


@dataclass(frozen=True)
class Import:
    target: str  # the absolute name of the module imported (a submodule when one is named)
    line: int
    module_level: bool
    text: str
    type_only: bool = False  # under ``if TYPE_CHECKING:``


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ImportCollector(ast.NodeVisitor):
    """Every import, those in the bodies of ``if TYPE_CHECKING:`` marked type-only."""

    def __init__(self, module: Module, source: str) -> None:
        self.module = module
        self.lines = source.splitlines()
        self.depth = 0  # functions we are inside
        self.type_only = 0  # ``if TYPE_CHECKING:`` bodies we are inside
        self.found: list[Import] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_only += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_only -= 1
            for stmt in node.orelse:
                self.visit(stmt)
            return
        self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function
    visit_Lambda = _function

    def _add(self, node: ast.stmt, target: str) -> None:
        text = self.lines[node.lineno - 1].strip()
        self.found.append(Import(target, node.lineno, self.depth == 0, text, self.type_only > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(node, submodule if submodule in MODULES else source)


def _imports(module: Module, *, type_only: bool = False) -> list[Import]:
    """The module's run-time imports; with ``type_only`` those under ``TYPE_CHECKING`` too."""
    source = module.path.read_text()
    collector = _ImportCollector(module, source)
    collector.visit(ast.parse(source, str(module.path)))
    return [imp for imp in collector.found if type_only or not imp.type_only]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --- the codemap ----------------------------------------------------------------------------------


def _codemap() -> dict[str, list[str]]:
    """Module name -> the names its line says it never imports."""
    entries: dict[str, list[str]] = {}
    for match in _ENTRY.finditer(_section("Codemap")):
        name, rest = match.groups()
        assert name not in entries, f"the codemap names {name} twice"
        never = _NEVER.search(rest)
        entries[name] = re.findall(r"`([\w.]+)`", never.group(1)) if never else []
    return entries


CODEMAP = _codemap()


def test_the_codemap_is_found() -> None:
    assert {"flashrt_core", "flashrt_core.runtime", "flashrt_qb", "flashrt_lb"} <= set(CODEMAP)


def test_every_codemap_module_exists() -> None:
    missing = sorted(set(CODEMAP) - set(MODULES))
    assert not missing, f"ARCHITECTURE.md's codemap names modules that do not exist: {missing}"


def test_every_package_module_is_in_the_codemap() -> None:
    unnamed = sorted(set(MODULES) - set(CODEMAP))
    assert not unnamed, (
        f"modules missing from ARCHITECTURE.md's codemap (add one line each): {unnamed}"
    )


def test_every_codemap_line_says_what_it_never_imports() -> None:
    silent = sorted(name for name, never in CODEMAP.items() if not never)
    assert not silent, f"codemap lines without a '**Never imports:**' rule: {silent}"


def test_no_module_imports_what_the_codemap_forbids() -> None:
    broken: list[str] = []
    for owner, forbidden in CODEMAP.items():
        if owner not in MODULES:
            continue  # reported by test_every_codemap_module_exists
        covered = [m for m in MODULES.values() if _under(m.name, owner)]
        if not MODULES[owner].is_package:
            covered = [MODULES[owner]]
        for module in covered:
            for imp in _imports(module):
                for name in forbidden:
                    if _under(imp.target, name):
                        rel = module.path.relative_to(ROOT)
                        broken.append(
                            f"{rel}:{imp.line}: {imp.text!r} imports {imp.target}, "
                            f"which the codemap line of {owner} forbids ({name})"
                        )
    assert not broken, "\n".join(broken)


# --- the invariants -------------------------------------------------------------------------------


def _test_refs() -> list[tuple[str, str, str | None]]:
    return [m.groups() for m in _TEST_REF.finditer(_section("Invariants"))]


def _defined_tests(path: Path) -> set[str]:
    """``name`` for module-level test functions, ``Class::name`` for methods."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}::{item.name}")
    return names


def test_the_invariants_name_tests() -> None:
    assert len(_test_refs()) >= 10


def test_every_invariant_names_a_test() -> None:
    bullets = re.split(r"^- ", _section("Invariants"), flags=re.M)[1:]
    untested = [b.split("\n", 1)[0] for b in bullets if not _TEST_REF.search(b)]
    assert not untested, f"invariants that name no test: {untested}"


def test_every_test_the_invariants_name_exists() -> None:
    missing: list[str] = []
    for rel, first, second in _test_refs():
        path = ROOT / rel
        wanted = f"{first}::{second}" if second else first
        if not path.is_file():
            missing.append(f"{rel} (no such file)")
        elif wanted not in _defined_tests(path):
            missing.append(f"{rel}::{wanted} (no such test)")
    assert not missing, f"ARCHITECTURE.md names tests that do not exist: {missing}"


# --- the plugins' context ------------------------------------------------------------------------

#: The deployed app's outcome on the PluginContext has one writer per process: the artifact
#: start-up plugin (worker, or in-process) and the executor's set-up (from what the worker
#: unpacked). Assignments to ``self.artifact`` are an object's own field (the context starting
#: it at ``None``, an unpacker's path), not a context's.
ARTIFACT_WRITERS = {"flashrt_core.builtin.artifact_startup", "flashrt_core.executor.server"}


def test_the_deployed_artifact_has_one_writer_per_process() -> None:
    writers: dict[str, list[int]] = {}
    for name, module in MODULES.items():
        tree = ast.parse(module.path.read_text(), str(module.path))
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == "artifact"
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")
                ):
                    writers.setdefault(name, []).append(node.lineno)
    assert set(writers) <= ARTIFACT_WRITERS, (
        f"only {sorted(ARTIFACT_WRITERS)} set a context's artifact; also: "
        f"{ {k: v for k, v in writers.items() if k not in ARTIFACT_WRITERS} }"
    )
    assert set(writers) == ARTIFACT_WRITERS, "a writer moved: update ARTIFACT_WRITERS"


# --- the import graph -----------------------------------------------------------------------------


def _core_graph() -> dict[str, list[Import]]:
    """flashrt_core module -> its imports (functions' and type-only ones too) of other
    flashrt_core modules."""
    graph: dict[str, list[Import]] = {}
    for name, module in MODULES.items():
        if not _under(name, "flashrt_core"):
            continue
        graph[name] = [
            imp
            for imp in _imports(module, type_only=True)
            if _under(imp.target, "flashrt_core") and imp.target != name
        ]
    return graph


def _find_cycle(graph: dict[str, list[Import]]) -> list[tuple[str, Import]] | None:
    """One cycle as (importer, import) pairs, or ``None``."""
    done: set[str] = set()
    stack: list[tuple[str, Import]] = []
    on_stack: dict[str, int] = {}

    def visit(name: str) -> list[tuple[str, Import]] | None:
        on_stack[name] = len(stack)
        for imp in graph.get(name, []):
            if imp.target in on_stack:
                return [*stack[on_stack[imp.target] :], (name, imp)]
            if imp.target in done or imp.target not in graph:
                continue
            stack.append((name, imp))
            found = visit(imp.target)
            if found is not None:
                return found
            stack.pop()
        del on_stack[name]
        done.add(name)
        return None

    for name in sorted(graph):
        if name not in done:
            found = visit(name)
            if found is not None:
                return found
    return None


def test_the_import_graph_is_found() -> None:
    graph = _core_graph()
    runtime_imports = {imp.target for imp in graph["flashrt_core.runtime"]}
    assert {"flashrt_core.protocol", "flashrt_core.capture"} <= runtime_imports
    # A function-level import (runtime -> supervisor) is an edge: it runs; so is a type-only
    # one (hookspecs -> context), which the codemap's rules let pass but the graph counts.
    assert "flashrt_core.supervisor" in runtime_imports
    hookspecs = {imp.target: imp for imp in graph["flashrt_core.hookspecs"]}
    assert hookspecs["flashrt_core.context"].type_only
    assert "flashrt_core.context" not in {
        imp.target for imp in _imports(MODULES["flashrt_core.hookspecs"])
    }


def test_a_type_only_cycle_is_found() -> None:
    """Two modules that need each other only for type hints are a cycle all the same."""
    a = Import("b", 3, True, "from . import b", type_only=True)
    b = Import("a", 5, True, "from . import a", type_only=False)
    cycle = _find_cycle({"a": [a], "b": [b]})
    assert cycle is not None and {importer for importer, _ in cycle} == {"a", "b"}


def test_the_core_import_graph_has_no_cycle() -> None:
    cycle = _find_cycle(_core_graph())
    if cycle is None:
        return
    lines = [
        f"  {MODULES[importer].path.relative_to(ROOT)}:{imp.line}: {imp.text}"
        for importer, imp in cycle
    ]
    path = " -> ".join([*(importer for importer, _ in cycle), cycle[0][0]])
    raise AssertionError(
        "flashrt_core's import graph has a cycle, counting imports under `if TYPE_CHECKING:` "
        "(a module that needs a name from a higher layer gets it handed in, or the name moves "
        "down a layer):\n"
        f"  {path}\n" + "\n".join(lines)
    )


# --- each executor's state has one owner ---------------------------------------------------------

_PROCESS = MODULES["flashrt_core.supervisor.process"]


def _executor_fields() -> set[str]:
    """The attributes ``ExecutorProcess`` sets on itself."""
    tree = ast.parse(_PROCESS.path.read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ExecutorProcess"]
    return {
        node.attr
        for node in ast.walk(cls)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def _writes_elsewhere(fields: set[str]) -> list[str]:
    """Assignments to an executor's fields, or reads of its private ones, outside its class."""
    found = []
    for module in MODULES.values():
        if not module.name.startswith("flashrt_core.") or module is _PROCESS:
            continue
        for node in ast.walk(ast.parse(module.path.read_text())):
            if not isinstance(node, ast.Attribute) or node.attr not in fields:
                continue
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                continue  # another class's own field of the same name
            private = node.attr.startswith("_")
            if private or isinstance(node.ctx, (ast.Store, ast.Del)):
                found.append(f"{module.name}:{node.lineno}: .{node.attr}")
    return found


def test_the_executor_state_is_found() -> None:
    fields = _executor_fields()
    assert {"_requests", "_abandoned", "_instances", "_exit_reason", "dead"} <= fields


def test_only_the_executor_changes_its_state() -> None:
    """Its fields change through its methods (assign, release, abandon, settle, holds, retire):
    no other module assigns them or reaches its private ones."""
    assert _writes_elsewhere(_executor_fields()) == []


# --- the glossary names what exists -------------------------------------------------------------

_GLOSSARY_NAME = re.compile(r"`([A-Z]\w*(?:\.\w+)?|\w+\.\w+)`")


def _glossary_names() -> list[str]:
    return sorted(set(_GLOSSARY_NAME.findall(_section("Glossary"))))


def test_the_glossary_is_found() -> None:
    assert {"PluginContext", "ExecutorProcess.retry_of", "MainThread"} <= set(_glossary_names())


def test_every_name_the_glossary_uses_exists() -> None:
    """A class, function, attribute or module the glossary names is defined in the packages."""
    source = "\n".join(module.path.read_text() for module in MODULES.values())
    missing = []
    for name in _glossary_names():
        if name.startswith("flashrt_"):
            if name not in MODULES:
                missing.append(name)
            continue
        last = name.rpartition(".")[2]
        if not re.search(rf"(class|def) {last}\b|\b{last}\b\s*[:=(]|\.{last}\b", source):
            missing.append(name)
    assert missing == [], f"the glossary names what the code does not define: {missing}"
