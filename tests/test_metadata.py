"""Packaging metadata (issue #20): no placeholder URL, package data that exists, a CITATION.cff that
parses and names the same version as pyproject.toml, a changelog that starts at that version."""

from __future__ import annotations

import glob
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _cff() -> dict:
    """CITATION.cff's top-level scalar keys and the names of its top-level lists (a minimal YAML reader,
    since PyYAML is not a dependency; PyYAML, when installed, must agree)."""
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    top = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line[0] in " -":
            continue
        m = re.match(r"^([A-Za-z][\w-]*):\s*(.*)$", line)
        assert m, f"CITATION.cff: not a 'key: value' line at the top level: {line!r}"
        top[m.group(1)] = m.group(2).strip().strip('"')
    try:
        import yaml
    except ImportError:
        return top
    parsed = yaml.safe_load(text)
    assert isinstance(parsed, dict) and set(parsed) == set(top)
    assert str(parsed["version"]) == top["version"]
    return top


def test_no_placeholder_urls():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "example.invalid" not in text and "example.com" not in text
    for url in _pyproject()["project"].get("urls", {}).values():
        assert url.startswith("https://") and "example" not in url, url


def test_package_data_matches_files():
    data = _pyproject().get("tool", {}).get("setuptools", {}).get("package-data", {})
    for package, patterns in data.items():
        folder = ROOT / package.replace(".", "/")
        for pattern in patterns:
            assert glob.glob(str(folder / pattern)), f"package-data {package}: {pattern!r} matches no file"


def test_build_requirement_reads_the_license_expression():
    project, build = _pyproject()["project"], _pyproject()["build-system"]
    if isinstance(project.get("license"), str):  # an SPDX expression (PEP 639) needs setuptools >= 77
        req = [r for r in build["requires"] if r.replace(" ", "").startswith("setuptools")]
        assert req, build["requires"]
        m = re.search(r">=\s*(\d+)", req[0])
        assert m and int(m.group(1)) >= 77, req[0]
        # setuptools >= 77 refuses a license classifier beside a license expression
        assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


def test_citation_names_the_software_and_its_version():
    cff, project = _cff(), _pyproject()["project"]
    assert cff["cff-version"].startswith("1.2")
    assert cff["title"] == project["name"] == "efftheory"
    assert cff["version"] == project["version"]
    assert cff["license"] == project["license"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", cff["date-released"])
    for key in ("authors", "abstract", "references"):
        assert key in cff, key


def test_changelog_has_the_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    version = _pyproject()["project"]["version"]
    assert re.search(rf"^## {re.escape(version)}\b", text, re.M), f"CHANGELOG.md has no '## {version}' section"
