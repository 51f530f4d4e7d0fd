"""The README and the docs/ pages: README stays short, every relative link resolves."""

import re
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def without_code_blocks(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code_blocks(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(without_code_blocks(path)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = path.parent / file_part if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_readme_is_short_and_links_every_docs_page():
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert len(PAGES) >= 4
    assert [page.name for page in PAGES if f"(docs/{page.name})" not in readme] == []


def test_every_relative_link_resolves():
    broken = {path.name: broken_links(path) for path in [README, *PAGES]}
    assert {name: links for name, links in broken.items() if links} == {}


def test_each_docs_page_starts_with_its_title_and_what_it_holds():
    for page in PAGES:
        title, blank, first = page.read_text(encoding="utf-8").splitlines()[:3]
        assert title.startswith("# ") and blank == "", page.name
        assert first and not first.startswith(("#", "|", "-", "`")), page.name


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[a](#page) [b](other.md#other-page) [c](https://example.com)\n"
                    "[d](missing.md) [e](other.md#nowhere)\n```\n[f](in-code.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#nowhere (no such heading)"]
