"""The documentation a user reads: every relative link leads to a file in the repository, and CI
runs exactly the quick-start commands the README shows (a README that drifts from CI lies)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
               *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def links(text: str) -> list[str]:
    """Link targets outside code (code may show link syntax without meaning a link)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def relative_links(doc: Path) -> list[str]:
    """Links into the repository (a bare '#anchor' points into the document itself)."""
    return [t for t in links(doc.read_text(encoding="utf-8")) if not EXTERNAL.match(t)]


def anchors(doc: Path) -> set[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    broken = []
    for target in relative_links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_readme_links_the_contract_documents() -> None:
    targets = set(relative_links(ROOT / "README.md"))
    assert {"docs/format.md", "docs/design.md"} <= {t.split("#", 1)[0] for t in targets}


def test_anchors_follow_github_headings(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("# Regions (parallel branches)\n## Beyond the rules: PyTorch's padding limits\n```\n# code\n```\n")
    assert anchors(doc) == {"regions-parallel-branches", "beyond-the-rules-pytorchs-padding-limits"}


def test_link_finder_sees_inline_and_reference_links_but_not_code() -> None:
    text = "a [x](../shared/FORMAT.md) b `[y](no.md)`\n```\n[z](no.md)\n```\n[r]: docs/r.md\n[w](https://e.org)"
    assert links(text) == ["../shared/FORMAT.md", "https://e.org", "docs/r.md"]


def quick_start_commands(readme: str) -> list[str]:
    """The lines of the ```bash blocks in the README's "## Quick start" section."""
    assert "\n## Quick start\n" in readme, "the README has no '## Quick start' section"
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 2, f"expected two bash blocks under '## Quick start', found {len(blocks)}"
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_quick_start_verbatim() -> None:
    commands = quick_start_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = set((ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines())
    missing = [c for c in commands if c not in ci]
    assert commands and not missing, f".ci/run does not run these README quick-start lines: {missing}"


INSTALL_BY_NAME = re.compile(r"pip install\s+(?:-U\s+|--upgrade\s+)?['\"]?convmerge\b", re.I)


def test_no_hint_installs_convmerge_by_name() -> None:
    """This project is not on the public index under its name: `pip install 'convmerge[onnx]'` installs an
    unrelated project there. Hints name what certainly works: the packages themselves, or the checkout."""
    texts = [*DOCS, *(ROOT / "convmerge").glob("*.py"), *(ROOT / "examples").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / "pyproject.toml"]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts if p.is_file()
            for m in INSTALL_BY_NAME.finditer(p.read_text(encoding="utf-8"))]
    assert not hits, hits
