"""The docs hold together: every relative link and image in README.md and docs/*.md points at a file
that exists (and, for a Markdown target with an anchor, at one of its headings), and every quoted
section name cited as being in docs/EXPERIMENTS.md names one of that file's sections."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
# 'docs/EXPERIMENTS.md`, "Name"' / 'docs/EXPERIMENTS.md: Name |' and '"Name" in `docs/EXPERIMENTS.md`'
CITED_AFTER = re.compile(r'docs/EXPERIMENTS\.md`?,? "([^"]+)"')
CITED_BEFORE = re.compile(r'"([^"]+)"\)? (?:in|under) `?docs/EXPERIMENTS\.md')


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def _section_titles(path: Path) -> list[str]:
    """Headings and bold paragraph titles ("**A VAE that holds kerbs (2026-11-29).** ...")."""
    text = " ".join(path.read_text().split())
    return _headings(path) + re.findall(r"\*\*([^*]+)\*\*", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            bad.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in {_slug(h) for h in _headings(file)}:
            bad.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not bad, f"{doc.name}: broken links:\n" + "\n".join(bad)


def test_sections_cited_in_experiments_exist():
    titles = _section_titles(ROOT / "docs" / "EXPERIMENTS.md")
    assert titles, "docs/EXPERIMENTS.md has no sections"
    missing = []
    for doc in DOCS:
        text = " ".join(doc.read_text().split())  # citations wrap across lines
        for name in CITED_AFTER.findall(text) + CITED_BEFORE.findall(text):
            if not any(t.startswith(name) for t in titles):
                missing.append(f'{doc.name}: "{name}"')
    assert not missing, "cited as sections of docs/EXPERIMENTS.md but not found there:\n" + "\n".join(missing)
