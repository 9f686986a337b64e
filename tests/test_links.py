"""Every file the package and its documents cite exists in the repository (issue #20).

Scanned: efftheory/**/*.py (docstrings, comments and strings), README.md, docs/**/*.md and the cell
sources of notebooks/*.ipynb.  Two kinds of reference:

* relative Markdown links ``[text](path)``, resolved against the citing file's folder (anchors
  stripped; external URLs, ``mailto:`` and same-page anchors skipped);
* path-like tokens ending in .md, .py, .ipynb, .json, .npz, .toml or .cff (``docs/theory.md``,
  ``benchmarks/bench_finite.py``), resolved against the repository root or the citing file's folder;
  a bare file name (``finite.py``) is accepted when a file of that name exists anywhere in the tree.
  Glob patterns (``*.npz``), URLs and the small allow-list of files written at run time are skipped.

Also checked: the section names that citations of docs/theory.md quote ("Infinite width", "The
network", ...) and the unquoted ones ("first order", "exact results", "last section") exist there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"

_SKIP_DIRS = {".git", ".venv", ".venv-nt", "out", "__pycache__", ".pytest_cache", ".hypothesis",
              "efftheory.egg-info", "build", "dist", ".ipynb_checkpoints"}

# Files that the package writes at run time (or that examples name as the user's own), never part of
# the repository: the CLI's and reports' outputs, the result store's manifest, an example script.
RUNTIME_FILES = {
    "report.json",           # efftheory compare/train, compare.Report.save, compare_train
    "report.npz",            # compare.Report.save: the whole report, read back by Report.load
    "__meta__.json",         # efftheory/_io.py: the JSON key inside a saved result's .npz, not a file
    "kernels.json",          # efftheory kernels --out
    "criticality.json",      # efftheory criticality --out
    "compare-config.json",   # the CLI's resume fingerprint in DIR
    "manifest.json",         # efftheory/theory/_store.py, in finite_width(store=DIR)
    "script.py",             # docs/scaling.md: "python script.py", the user's own program
}
# Placeholder folders in front of run-time files (DIR/report.json, out/demo/report.json).
_PLACEHOLDER_PREFIXES = ("DIR/", "out/")

_EXT = r"(?:md|py|ipynb|json|npz|toml|cff)"
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_TOKEN = re.compile(r"(?<![\w./*{<$~-])((?:[\w.-]+/)*[\w-][\w.-]*\." + _EXT + r")(?![\w/*])")
_URL = re.compile(r"\b(?:https?|ftp|file)://\S+|\bwww\.\S+")


def _sources():
    yield from sorted((ROOT / "efftheory").rglob("*.py"))
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))
    yield from sorted((ROOT / "notebooks").glob("*.ipynb"))


def _text(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c.get("source", "")) for c in cells)
    return path.read_text(encoding="utf-8")


def _tree_names() -> set[str]:
    names = set()
    for _folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        names.update(files)
    return names


def _link_ok(target: str, src: Path) -> bool:
    if target.startswith(("#", "mailto:")) or _URL.match(target) or "://" in target:
        return True
    target = target.split("#", 1)[0]
    return not target or (src.parent / target).exists()


def _token_ok(token: str, src: Path, names: set[str]) -> bool:
    if token.startswith(_PLACEHOLDER_PREFIXES) and token.rsplit("/", 1)[-1] in RUNTIME_FILES:
        return True
    if token in RUNTIME_FILES:
        return True
    if "/" not in token and token in names:
        return True
    return (ROOT / token).exists() or (src.parent / token).exists()


def broken_references() -> list[str]:
    """'file: reference' for every cited file that does not exist."""
    names = _tree_names()
    bad = []
    for src in _sources():
        text = _text(src)
        rel = src.relative_to(ROOT).as_posix()
        for m in _LINK.finditer(text):
            if not _link_ok(m.group(1), src):
                bad.append(f"{rel}: link ({m.group(1)})")
        for m in _TOKEN.finditer(_URL.sub(" ", text)):
            if not _token_ok(m.group(1), src, names):
                bad.append(f"{rel}: {m.group(1)}")
    return sorted(set(bad))


def test_cited_files_exist():
    bad = broken_references()
    assert not bad, "references to files that are not in the repository:\n  " + "\n  ".join(bad)


def test_scanner_catches_a_stale_reference(tmp_path):
    """The patterns see what they must: a stale token, a stale link; and skip what they must."""
    names = _tree_names()
    src = ROOT / "docs" / "theory.md"
    assert not _token_ok("THEORY.md", src, names)
    assert not _token_ok("docs/no_such_page.md", src, names)
    assert _token_ok("docs/theory.md", src, names) and _token_ok("finite_width.md", src, names)
    assert _token_ok("DIR/report.json", src, names) and _token_ok("out/demo/report.json", src, names)
    assert not _token_ok("docs/report.json", src, names)
    assert not _link_ok("no_such_page.md#x", src) and _link_ok("bayes.md#setup", src)
    assert _link_ok("https://arxiv.org/abs/2106.10165", src) and _link_ok("#exact-results", src)
    text = "see `docs/THEORY.md`, benchmarks/bench_x.py and *.npz, https://x.org/a.py"
    assert [m.group(1) for m in _TOKEN.finditer(_URL.sub(" ", text))] == ["docs/THEORY.md", "benchmarks/bench_x.py"]


def _headings() -> list[str]:
    return [re.sub(r"^#+\s*", "", line).strip() for line in THEORY.read_text(encoding="utf-8").splitlines()
            if re.match(r"#{1,4}\s", line)]


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


_QUOTED = re.compile(r'theory\.md(?:\'s)?[,:]?\s*\(?\s*\\?"([^"\\]{2,80})\\?"')


def _quoted_sections() -> list[tuple[str, str]]:
    found = []
    files = list(_sources()) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    for src in files:
        if src.resolve() == Path(__file__).resolve():  # this file's own string literals
            continue
        for m in _QUOTED.finditer(_text(src)):
            found.append((src.relative_to(ROOT).as_posix(), _norm(m.group(1).rstrip(".,;:"))))
    return found


def test_theory_sections_that_citations_name_exist():
    assert THEORY.exists()
    heads = [_norm(h) for h in _headings()]
    quoted = _quoted_sections()
    assert quoted, "expected docstrings citing docs/theory.md sections by name"
    missing = [f"{f}: {q!r}" for f, q in quoted if q not in heads]
    assert not missing, "docs/theory.md has no section named:\n  " + "\n  ".join(missing)
    # unquoted citations: "docs/theory.md, first order", "exact results", "last section"
    assert any(h.startswith("first order") for h in heads)
    assert "exact results" in heads
    top = [_norm(re.sub(r"^##\s*", "", line)) for line in THEORY.read_text(encoding="utf-8").splitlines()
           if line.startswith("## ")]
    assert top[-1] == "how a prediction is confirmed", top  # README: "docs/theory.md, last section"


@pytest.mark.parametrize("heading", ["The network", "Infinite width", "Criticality and universality classes",
                                     "First order in 1/n", "Normalisation of returned tensors", "Exact results",
                                     "How a prediction is confirmed"])
def test_theory_has_its_sections(heading):
    assert _norm(heading) in [_norm(h) for h in _headings()]
