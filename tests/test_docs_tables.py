"""Every results table of the documentation is a render of committed files, never typed.

README.md, docs/*.md and results/**/README.md hold tables between markers:

- ``<!-- report results/FOLDER [--baseline=MODEL] -->`` ... ``<!-- /report -->``: the output of
  ``python -m recbole_iisan.report results/FOLDER`` (the comparison table of the folder's result
  files: mean ± std over seeds, paired bootstrap interval, Holm-corrected paired test);
- ``<!-- include results/FOLDER/FILE.md -->`` ... ``<!-- /include -->``: a file a benchmark or
  command wrote, verbatim.

Each block is re-rendered from the committed files and must equal what the page shows; a block
whose folder has no results yet must be empty (a slot), never hold typed numbers. Refresh them
with ``python -m recbole_iisan.report --docs README.md docs/*.md results/*/README.md``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from recbole_iisan.quick_start.results import DOC_BLOCK, render_block

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "results").glob("**/README.md"))]


def blocks() -> list[tuple[str, str, str, str]]:
    out = []
    for page in PAGES:
        if page.is_file():
            for m in DOC_BLOCK.finditer(page.read_text(encoding="utf-8")):
                out.append((str(page.relative_to(REPO)), m.group(2), m.group(3).strip(), m.group(4)))
    return out


def test_the_docs_show_comparison_tables() -> None:
    assert any(kind == "report" for _, kind, _, _ in blocks()), "no <!-- report FOLDER --> block in the docs"


@pytest.mark.parametrize("page,kind,args,body", blocks(), ids=lambda v: str(v)[:60])
def test_each_table_is_the_render_of_its_files(page: str, kind: str, args: str, body: str) -> None:
    expected = render_block(kind, args, REPO)
    if expected is None:
        assert body.strip() == "", f"{page}: <!-- {kind} {args} --> holds text but {args.split()[0]} has no results yet"
        return
    assert body.strip() == expected.strip(), (
        f"{page}: the <!-- {kind} {args} --> block is not the render of the committed files; refresh it with "
        f"python -m recbole_iisan.report --docs {page}")
