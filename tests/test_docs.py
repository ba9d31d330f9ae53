"""The README stays a newcomer's page (short, CI's test command, one results table that matches its docs/ page) and
every relative link in README.md and docs/*.md reaches an existing file and heading; every section `make demo`
regenerates has its markers on the docs/ page the demo writes."""
from __future__ import annotations

import itertools
import re
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MARKER = re.compile(r"<!-- ([a-z0-9-]+):(start|end) -->")


def prose(text: str) -> str:
    """The text outside ``` fences (a link or heading inside a code block is not one)."""
    return "".join(part for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered -1, -2, ..."""
    seen: Counter[str] = Counter()
    out = set()
    for heading in re.findall(r"^#+ (.+)$", prose(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def test_slug_rule_matches_github():
    text = "# A: b (`make demo HARD=1`)\n## Sample quality\n### Sample quality\n```\n# not a heading\n```\n"
    assert anchors(text) == {"a-b-make-demo-hard1", "sample-quality", "sample-quality-1"}


def test_readme_is_short_and_keeps_the_ci_command():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 200, "README.md is a newcomer's page: move details to a docs/ page"
    assert "make test" in text    # .ci/run runs the README's test command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):    # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, broken


def test_readme_results_table_is_the_pages():
    """The README's one table is copied from the page `make demo` writes: a rerun that changes the page's numbers
    fails here until the README is updated too."""
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| W")]
    assert len(rows) >= 2
    page = (REPO / "docs/results-fashion.md").read_text()
    assert [row for row in rows if row not in page] == []


def test_readme_dit_table_numbers_are_the_dit_pages():
    """Every number of the README's DiT table is in docs/DIT.md, which `make demo DIT=1` writes."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| embedded DiT at W4A8"):].split("\n\n")[0]
    numbers = re.findall(r"\d+\.\d+", table)
    assert len(numbers) >= 20
    page = (REPO / "docs/DIT.md").read_text()
    assert [n for n in numbers if n not in page] == []


def test_markers_pair_up_once_per_page():
    for page in PAGES:
        found = Counter(MARKER.findall(page.read_text()))
        for (tag, kind), n in found.items():
            assert n == 1, f"{page.name}: {tag}:{kind} {n} times"
            assert found[(tag, "start" if kind == "end" else "end")] == 1, f"{page.name}: {tag} unpaired"
    assert "<!--" not in (REPO / "README.md").read_text()   # nothing writes the README


def test_every_demo_section_has_its_markers_on_its_page():
    from evaluation.report import results_page
    from quant_scripts import demo
    tags = set()
    for preset, mode, eta, qncd, smooth, hard in itertools.product(
            ("fashion", "fashion-ddim", "fashion-txt2img"), ("default", "long"), (0.0, 1.0), *[(False, True)] * 3):
        tags.add(demo.readme_tag(Namespace(outdir=None, sm_abit=None, preset=preset, mode=mode, eta=eta, qncd=qncd,
                                           smooth=smooth, hard=hard)))
    tags.discard(None)
    assert {"demo-results", "demo-qncd-results", "demo-pixel-results", "demo-text-results"} <= tags
    for tag in sorted(tags):
        page = REPO / results_page(tag)
        assert page.parent == REPO / "docs", (tag, page)
        text = page.read_text()
        assert f"<!-- {tag}:start -->" in text and f"<!-- {tag}:end -->" in text, (tag, page.name)
