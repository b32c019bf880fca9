"""The README and docs cannot drift from the code: its pass and pipeline tables match the
registry, every relative link resolves, and the README stays an entry point."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import snncc.passes  # noqa: F401  (registers every pass)
from snncc.pipeline import DEFAULT_T, PASSES, PIPELINES

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCUMENTS = [README, REPO / "benchmarks" / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def broken_links(path: Path) -> list[str]:
    """Relative links in `path` whose file, or heading anchor in a Markdown file, does not exist."""
    broken = []
    for target in _links(path):
        file, _, fragment = unquote(target).partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(target)
    return broken


def _table_rows(section: str) -> list[list[str]]:
    """The cells of the table under the README heading `## section`."""
    text = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]  # no header row


def test_readme_is_an_entry_point():
    assert len(README.read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    assert len(DOCUMENTS) > 3
    broken = {path.relative_to(REPO).as_posix(): broken_links(path) for path in DOCUMENTS}
    assert {path: links for path, links in broken.items() if links} == {}


def test_the_pass_table_lists_every_registered_pass():
    names = [re.match(r"`([\w-]+)`", row[0]).group(1) for row in _table_rows("Passes")]
    assert sorted(names) == sorted(PASSES)


def test_the_pipeline_table_gives_every_pipeline_its_exact_passes():
    listed, default_T = {}, {}
    for row in _table_rows("Pipelines"):
        name = re.match(r"`([\w-]+)`", row[0]).group(1)
        passes = re.fullmatch(r"`([^`]*)`", row[1])
        listed[name] = tuple(p.strip() for p in passes.group(1).split(",")) if passes else ()
        if row[2].isdigit():
            default_T[name] = int(row[2])
    assert listed == dict(PIPELINES)
    assert default_T == DEFAULT_T


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [no anchor](there.md#nowhere) "
                    "[web](https://example.org/x)\n```\n[in code](ignored.md)\n```\n")
    assert broken_links(page) == ["missing.md", "there.md#nowhere"]
