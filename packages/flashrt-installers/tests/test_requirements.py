"""Validation of dependency strings and the 'already satisfied' checks, on the real environment."""

from __future__ import annotations

from importlib import metadata

import pytest
from flashrt_installers.requirements import (
    installed_debian_packages,
    missing_debian_packages,
    parse_debian_packages,
    parse_python_requirement,
    parse_python_requirements,
    unsatisfied_python_requirements,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("numpy", "numpy"),
        ("  NumPy >= 1.20 , <3 ", "numpy<3,>=1.20"),
        ("Foo_Bar[Socks,Extra2]==1.0", "foo-bar[extra2,socks]==1.0"),
        ('idna==3.7; python_version >= "3.8"', 'idna==3.7; python_version >= "3.8"'),
        (
            "pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl",
            "pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl",
        ),
        ("pkg@git+https://example.invalid/a/b@v1", "pkg @ git+https://example.invalid/a/b@v1"),
    ],
)
def test_valid_python_requirements_are_normalised(raw: str, normalized: str) -> None:
    assert parse_python_requirement(raw).normalized == normalized


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("--index-url=http://x", "installer options are not accepted"),
        ("-e .", "installer options are not accepted"),
        ("  -r requirements.txt", "installer options are not accepted"),
        ("numpy; rm -rf /", "not a PEP 508 requirement"),
        ("numpy && curl x | sh", "not a PEP 508 requirement"),
        ("pkg name", "not a PEP 508 requirement"),
        ("../x", "not a PEP 508 requirement"),
        ("./local/dir", "not a PEP 508 requirement"),
        ("https://example.invalid/x.whl", "not a PEP 508 requirement"),
        ("numpy\n--index-url=http://x", "control characters"),
        ("", "empty"),
        ("x" * 3000, "longer than"),
        ("pkg @ ftp://example.invalid/pkg.whl", "URL scheme not supported"),
        (42, "expected a string"),
    ],
)
def test_invalid_python_requirements_are_rejected_quoting_the_string(
    raw: object, reason: str
) -> None:
    with pytest.raises(ValueError) as info:
        parse_python_requirements(["six", raw])
    message = str(info.value)
    assert reason in message
    assert repr(raw)[:60] in message or "..." in message


def test_duplicates_collapse_and_order_is_kept() -> None:
    reqs = parse_python_requirements(["b", "A", "a", "B==1"])
    assert [r.normalized for r in reqs] == ["b", "a", "b==1"]


def test_satisfied_checks_read_installed_versions_markers_and_extras() -> None:
    pluggy = metadata.version("pluggy")
    cases = {
        f"pluggy=={pluggy}": True,
        "pluggy>=1": True,
        "pluggy<0.1": False,
        "definitely-not-installed-flashrt-xyz": False,
        # A marker that does not hold: nothing to install, so nothing is missing.
        'definitely-not-installed-flashrt-xyz; python_version < "3"': True,
        # urllib3's 'brotli' extra needs brotli (installed here), 'socks' needs PySocks (not).
        "urllib3[brotli]": True,
        "urllib3[socks]": False,
        # Unknown extras are accepted by installers with a warning; so they are here.
        "pluggy[no-such-extra]": True,
        "pluggy @ https://example.invalid/pluggy.whl": False,
    }
    for raw, satisfied in cases.items():
        missing = unsatisfied_python_requirements(parse_python_requirements([raw]))
        assert (not missing) is satisfied, raw


@pytest.mark.parametrize(
    ("raw", "spec"),
    [
        ("libgl1", "libgl1"),
        ("g++", "g++"),
        ("libc6:amd64", "libc6:amd64"),
        ("coreutils=9.1-1", "coreutils=9.1-1"),
        ("libfoo1=1:2.3~rc1+dfsg-4", "libfoo1=1:2.3~rc1+dfsg-4"),
    ],
)
def test_valid_debian_names(raw: str, spec: str) -> None:
    assert [p.spec for p in parse_debian_packages([raw])] == [spec]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("-o foo", "installer options are not accepted"),
        ("--allow-unauthenticated", "installer options are not accepted"),
        ("../x", "not a Debian package name"),
        ("pkg name", "not a Debian package name"),
        ("LibGL1", "not a Debian package name"),
        ("a", "not a Debian package name"),
        ("curl;rm", "not a Debian package name"),
        ("/tmp/evil.deb", "not a Debian package name"),
        ("coreutils=latest", "invalid Debian version"),
        ("coreutils:AMD64", "invalid architecture"),
    ],
)
def test_invalid_debian_names_are_rejected_quoting_the_string(raw: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_debian_packages(["libgl1", raw])
    assert reason in str(info.value)
    assert repr(raw) in str(info.value)


STATUS = """\
Package: coreutils
Essential: yes
Status: install ok installed
Architecture: amd64
Version: 9.1-1
Description: GNU core utilities
 with a continuation line: Package: fake

Package: removed-pkg
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0
"""


def test_dpkg_status_parsing_and_missing_packages() -> None:
    installed = installed_debian_packages(STATUS)
    assert installed == {("coreutils", "amd64"): "9.1-1", ("tzdata", "all"): "2024a-0"}
    pkgs = parse_debian_packages(
        [
            "coreutils",
            "coreutils:amd64",
            "tzdata:amd64",
            "coreutils=9.1-1",
            "removed-pkg",
            "coreutils=9.2-1",
            "fake",
        ]
    )
    missing = [p.spec for p in missing_debian_packages(pkgs, installed)]
    assert missing == ["removed-pkg", "coreutils=9.2-1", "fake"]
