"""Tables: GitHub-flavoured markdown (``tabulate``, the library pandas uses for ``to_markdown``)
and CSV files written atomically."""
from __future__ import annotations

import csv
import io
from typing import Sequence

from recbole_iisan.utils.files import PathLike, atomic_write_text


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table (``tabulate``, ``github`` format: aligned columns)."""
    from tabulate import tabulate

    return tabulate([[str(row.get(c, "")) for c in columns] for row in rows], headers=list(columns),
                    tablefmt="github", disable_numparse=True)


def write_csv(path: PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
