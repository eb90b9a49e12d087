"""The repository documents itself: every docs/ anchor the code cites exists, and nothing cites files outside it."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
SOURCES = [p for d in ("raybench", "tests", "bench", "jobs", "docs") for p in (ROOT / d).rglob("*")
           if p.suffix in {".py", ".md", ".toml"}] + [ROOT / "README.md", ROOT / "cluster.yaml"]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to dashes."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_cited_docs_anchor_exists():
    cited = {(m.group(1), m.group(2)) for p in SOURCES if p.name != "test_docs.py"
             for m in re.finditer(r"docs/(\w+\.md)#([\w\-]+)", p.read_text())}
    assert cited, "the code cites docs/ pages"
    missing = sorted(f"docs/{page}#{anchor}" for page, anchor in cited
                     if anchor not in _anchors(ROOT / "docs" / page))
    assert not missing, missing


def test_nothing_cites_files_outside_the_repository():
    pattern = re.compile(r"\b(METHODS|RAY|DESIGN)\.md|\.\./shared")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "test_docs.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
