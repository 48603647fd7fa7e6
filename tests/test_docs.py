"""The documentation builds: ``mkdocs build --strict`` (what ``make docs`` runs) fails on a
broken link or anchor between the pages, a page missing from the nav, and a docstring
the API reference cannot render; the README's own links point at files that exist; and
no page names a path of the machine it was written on."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root)/")


def test_strict_build_has_no_warnings(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (`pip install -e '.[dev]'` installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "ensemble" / "index.html").is_file()
    assert "Ensemble.load" in (tmp_path / "site" / "api" / "ensemble" / "index.html").read_text()


def test_readme_links_point_at_files() -> None:
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "the README links to its docs"
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = REPO / target.split("#", 1)[0]
        assert path.exists(), f"README.md links to {target}, which does not exist"


def test_docs_name_no_machine_paths() -> None:
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md")),
             *sorted((REPO / "docs").rglob("*.json"))]
    found = [f"{page.relative_to(REPO)}: {match.group(0)}"
             for page in pages for match in MACHINE_PATH.finditer(page.read_text())]
    assert not found, found
