"""The repository documents itself: README.md and docs/ point only at files a clone has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("architecture", "api", "protocol", "python-stages", "deployment", "tuning")
# [text](target) and [text]: target; images too. Code spans are removed before matching.
LINK = re.compile(
    r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M
)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
CODE_BLOCK = re.compile(r"```.*?```", re.S)
# `deploy/...`, `orchestrator/...`: a path of the repository named in a code span.
REPO_PATH = re.compile(r"`((?:deploy|docs|orchestrator|proto|tests|worker)/[\w./-]*)`")


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", CODE_BLOCK.sub("", doc.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_page_is_there() -> None:
    for page in PAGES:
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_outside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    for banned in ("../shared", "DESIGN.md"):
        assert banned not in text, f"{doc.name} mentions {banned}, which users never see"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(doc: Path) -> None:
    text = CODE.sub("", doc.read_text())
    targets = [a or b for a, b in LINK.findall(text)]
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.name} links to {target}, which does not exist"
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{doc.name} links to {target}: no such heading"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_in_code_spans_exist(doc: Path) -> None:
    for path in REPO_PATH.findall(doc.read_text()):
        assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_readme_lists_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert f"(docs/{page}.md)" in readme, page
