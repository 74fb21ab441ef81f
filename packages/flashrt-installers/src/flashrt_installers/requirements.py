"""Validate dependency strings and tell whether the running environment already satisfies them.

Every string a client sends is checked here, synchronously, before any installer runs: a Python
dependency must be a PEP 508 requirement and a system dependency a Debian package name
(optionally ``=version``). Installers are then given the *normalised* form, never the raw string,
always after ``--``, so nothing a client sends can become an installer option.
"""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import metadata
from typing import TYPE_CHECKING

from packaging.markers import InvalidMarker, Marker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "MAX_DEPENDENCIES",
    "MAX_DEPENDENCY_CHARS",
    "DebianPackage",
    "PythonRequirement",
    "installed_debian_packages",
    "missing_debian_packages",
    "parse_debian_packages",
    "parse_python_requirements",
    "unsatisfied_python_requirements",
]

#: Longest dependency string accepted (a long URL fits; a pasted script does not).
MAX_DEPENDENCY_CHARS = 2048
#: Most dependencies of one kind in one request.
MAX_DEPENDENCIES = 256

_URL_SCHEMES = ("https://", "http://", "file://", "git+", "hg+", "svn+", "bzr+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Debian policy §5.6.1: lower-case letters, digits, '+', '-', '.'; at least two characters,
# starting with an alphanumeric. An architecture qualifier (``:amd64``) is allowed, as is an
# exact version (§5.6.12: [epoch:]upstream[-revision], upstream starting with a digit).
_DEBIAN_NAME = re.compile(r"[a-z0-9][a-z0-9+.\-]+")
_DEBIAN_ARCH = re.compile(r"[a-z0-9][a-z0-9\-]*")
_DEBIAN_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~:\-]*")

# Parsed forms of the raw strings seen so far: a warm request re-validates in a dict lookup.
_PY_CACHE: dict[str, PythonRequirement] = {}
_DEB_CACHE: dict[str, DebianPackage] = {}
_CACHE_LIMIT = 4096


def _quote(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 200 else text[:197] + "..."


def _check_text(raw: object, what: str) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"invalid {what} {_quote(raw)}: expected a string")
    text = raw.strip()
    if not text:
        raise ValueError(f"invalid {what} {_quote(raw)}: empty")
    if len(text) > MAX_DEPENDENCY_CHARS:
        raise ValueError(
            f"invalid {what} {_quote(raw)}: longer than {MAX_DEPENDENCY_CHARS} characters"
        )
    if _CONTROL.search(text):
        raise ValueError(f"invalid {what} {_quote(raw)}: contains control characters")
    if text.startswith("-"):
        raise ValueError(
            f"invalid {what} {_quote(raw)}: installer options are not accepted, only package names"
        )
    return text


# --- Python -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PythonRequirement:
    """A validated PEP 508 requirement and its normalised text (what installers receive)."""

    raw: str
    requirement: Requirement
    normalized: str

    @property
    def name(self) -> str:
        """The canonical (PEP 503) project name."""
        return canonicalize_name(self.requirement.name)

    def applies(self) -> bool:
        """Whether the marker (if any) holds for the running interpreter."""
        marker = self.requirement.marker
        return marker is None or _evaluate(marker, "")


def _evaluate(marker: Marker, extra: str) -> bool:
    try:
        return marker.evaluate({"extra": extra})
    except (UndefinedComparison, UndefinedEnvironmentName, InvalidMarker):
        return False


def _normalize(req: Requirement) -> str:
    text: str = canonicalize_name(req.name)
    if req.extras:
        text += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    if req.url:
        text += f" @ {req.url}"
        if req.marker is not None:
            text += " "  # PEP 508: a space must separate the URL from the marker's ';'
    else:
        text += str(req.specifier)
    if req.marker is not None:
        text += f"; {req.marker}"
    return text


def parse_python_requirement(raw: object) -> PythonRequirement:
    """Validate one Python dependency; ``ValueError`` quoting it when it is not acceptable."""
    if isinstance(raw, str):
        hit = _PY_CACHE.get(raw)
        if hit is not None:
            return hit
    text = _check_text(raw, "Python dependency")
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0].strip()
        raise ValueError(
            f"invalid Python dependency {_quote(raw)}: not a PEP 508 requirement ({reason})"
        ) from None
    if req.url is not None and not req.url.startswith(_URL_SCHEMES):
        raise ValueError(
            f"invalid Python dependency {_quote(raw)}: URL scheme not supported "
            f"(use one of {', '.join(s.rstrip(':/+') for s in _URL_SCHEMES)})"
        )
    parsed = PythonRequirement(raw=text, requirement=req, normalized=_normalize(req))
    if len(_PY_CACHE) >= _CACHE_LIMIT:
        _PY_CACHE.clear()
    _PY_CACHE[str(raw)] = parsed
    return parsed


def parse_python_requirements(raws: Iterable[object]) -> tuple[PythonRequirement, ...]:
    """Validate a request's Python dependencies, dropping exact duplicates, keeping order."""
    items = list(raws)
    if len(items) > MAX_DEPENDENCIES:
        raise ValueError(f"too many Python dependencies ({len(items)} > {MAX_DEPENDENCIES})")
    seen: dict[str, PythonRequirement] = {}
    for raw in items:
        req = parse_python_requirement(raw)
        seen.setdefault(req.normalized, req)
    return tuple(seen.values())


def _dist_satisfies(
    req: Requirement, extras_env: str, seen: set[tuple[str, str]], depth: int
) -> bool:
    """Whether ``req`` (for the extra ``extras_env`` context) is met by an installed dist."""
    name = canonicalize_name(req.name)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    if req.url is not None:
        return _same_direct_url(dist, req.url)
    if req.specifier:
        try:
            version = Version(dist.version)
        except InvalidVersion:
            return False
        if not req.specifier.contains(version, prereleases=True):
            return False
    if depth > 8:
        return True
    for extra in sorted(req.extras):
        key = (name, canonicalize_name(extra))
        if key in seen:
            continue
        seen.add(key)
        provided = {canonicalize_name(e) for e in (dist.metadata.get_all("Provides-Extra") or ())}
        if key[1] not in provided:
            # Installers accept an unknown extra with a warning; so do we.
            continue
        for line in dist.requires or ():
            try:
                sub = Requirement(line)
            except InvalidRequirement:
                continue
            if sub.marker is None or not _evaluate(sub.marker, key[1]):
                continue
            if _evaluate(sub.marker, ""):
                continue  # a base dependency: present whenever the dist is
            if not _dist_satisfies(sub, key[1], seen, depth + 1):
                return False
    return True


def _same_direct_url(dist: metadata.Distribution, url: str) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        info = json.loads(text)
    except ValueError:
        return False
    recorded = str(info.get("url", ""))
    vcs = info.get("vcs_info")
    if isinstance(vcs, dict):
        rev = vcs.get("requested_revision")
        recorded = f"{vcs.get('vcs')}+{recorded}" + (f"@{rev}" if rev else "")
    return recorded == url


def unsatisfied_python_requirements(
    reqs: Iterable[PythonRequirement],
) -> list[PythonRequirement]:
    """The requirements (whose markers apply) that the running environment does not meet.

    Reads installed metadata (``importlib.metadata``): call it off the event loop.
    """
    missing: list[PythonRequirement] = []
    for req in reqs:
        if not req.applies():
            continue
        if not _dist_satisfies(req.requirement, "", set(), 0):
            missing.append(req)
    return missing


# --- Debian -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DebianPackage:
    """A validated Debian package name with optional ``:arch`` and ``=version``."""

    name: str
    arch: str | None
    version: str | None

    @property
    def spec(self) -> str:
        """What apt-get receives: ``name[:arch][=version]``."""
        text = self.name + (f":{self.arch}" if self.arch else "")
        return text + (f"={self.version}" if self.version else "")


def parse_debian_package(raw: object) -> DebianPackage:
    """Validate one system dependency; ``ValueError`` quoting it when it is not acceptable."""
    if isinstance(raw, str):
        hit = _DEB_CACHE.get(raw)
        if hit is not None:
            return hit
    text = _check_text(raw, "system dependency")
    name, sep, version = text.partition("=")
    name, _, arch = name.partition(":")
    problem = None
    if not _DEBIAN_NAME.fullmatch(name):
        problem = (
            "not a Debian package name (lower-case letters, digits, '+', '-', '.'; "
            "at least two characters, starting with a letter or digit)"
        )
    elif arch and not _DEBIAN_ARCH.fullmatch(arch):
        problem = "invalid architecture qualifier"
    elif sep and not _DEBIAN_VERSION.fullmatch(version):
        problem = "invalid Debian version after '='"
    if problem:
        raise ValueError(f"invalid system dependency {_quote(raw)}: {problem}")
    pkg = DebianPackage(name=name, arch=arch or None, version=version or None)
    if len(_DEB_CACHE) >= _CACHE_LIMIT:
        _DEB_CACHE.clear()
    _DEB_CACHE[str(raw)] = pkg
    return pkg


def parse_debian_packages(raws: Iterable[object]) -> tuple[DebianPackage, ...]:
    """Validate a request's system dependencies, dropping duplicates, keeping order."""
    items = list(raws)
    if len(items) > MAX_DEPENDENCIES:
        raise ValueError(f"too many system dependencies ({len(items)} > {MAX_DEPENDENCIES})")
    seen: dict[str, DebianPackage] = {}
    for raw in items:
        pkg = parse_debian_package(raw)
        seen.setdefault(pkg.spec, pkg)
    return tuple(seen.values())


def installed_debian_packages(status_text: str) -> dict[tuple[str, str], str]:
    """(name, architecture) -> version of every fully installed package in a dpkg status file.

    Reads the database text rather than running ``dpkg-query``, so checking what is installed
    starts no process at all.
    """
    installed: dict[tuple[str, str], str] = {}
    for stanza in status_text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if not line or line[0] in " \t":
                continue
            key, _, value = line.partition(":")
            if key in ("Package", "Status", "Version", "Architecture"):
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            ident = (fields["Package"], fields.get("Architecture", ""))
            installed[ident] = fields.get("Version", "")
    return installed


def missing_debian_packages(
    pkgs: Iterable[DebianPackage], installed: Mapping[tuple[str, str], str]
) -> list[DebianPackage]:
    """The packages not installed (or installed at another version than the one pinned)."""
    by_name: dict[str, list[tuple[str, str]]] = {}
    for (name, arch), version in installed.items():
        by_name.setdefault(name, []).append((arch, version))
    missing = []
    for pkg in pkgs:
        candidates = [
            version
            for arch, version in by_name.get(pkg.name, ())
            if pkg.arch is None or arch in (pkg.arch, "all")
        ]
        if not candidates or (pkg.version is not None and pkg.version not in candidates):
            missing.append(pkg)
    return missing
