"""Where a benchmark's results go: a markdown table and its JSON record beside it, each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_report(out: Path, lines: list[str], record: Any) -> None:
    """Write `lines` to `out` (markdown) and `record` to `out` with a .json suffix, then print the table.

    Each file goes to a `.partial` name first and is renamed when complete, so an interrupted run leaves the
    previous results whole.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (out, "\n".join(lines) + "\n"),
        (out.with_suffix(".json"), json.dumps(record, indent=1, default=str) + "\n"),
    ):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
    print("\n".join(lines))
