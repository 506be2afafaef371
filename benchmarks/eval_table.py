#!/usr/bin/env python
"""One table from `fastgen eval --json` records: full-prompt and open-prompt figures of several models side by
side, each set against the first row (the teacher) as the open-prompts goals read.

Models evaluated one by one (each its own `fastgen eval` process, same seed and prompts) when a single
`bench_shapes.py` run would not fit the time at hand; speed is not compared here (bench_shapes does that).

    fastgen eval --model shapes-teacher --n 1000 --json > teacher_full.json
    fastgen eval --model shapes-teacher --open --n 1000 --json > teacher_open.json
    ...
    python benchmarks/eval_table.py --row "teacher|teacher_full.json|teacher_open.json" \\
        --row "2-RF|2rf_full.json|2rf_open.json" --out benchmarks/results/open_prompts_students.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import write_report


def read_record(path: str) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def table(rows: list[tuple[str, dict | None, dict | None]]) -> list[str]:
    """Markdown lines: full prompts (all attributes, rejected, fidelity), open prompts (stated, per-kind, open TV,
    rejected, fidelity), and the ratios and differences to the first row."""
    _, first_full, first_open = rows[0]
    header = (
        "| model | full: all | full: rejected | full: fidelity | all / teacher | fidelity / teacher "
        "| open: stated | colour and shape | no colour | shape only | random subset | open TV | open: rejected "
        "| open: fidelity | stated / teacher | TV - teacher | open fidelity / teacher |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, full, open_ in rows:
        cells = [label]
        if full:
            cells += [f"{full['adherence']['all']:.3f}", f"{full['rejected']:.3f}", f"{full['fidelity']:.2f}"]
            cells += (
                [f"{full['adherence']['all'] / first_full['adherence']['all']:.3f}",
                 f"{full['fidelity'] / first_full['fidelity']:.2f}"]
                if first_full else ["", ""]
            )  # fmt: skip
        else:
            cells += [""] * 5
        if open_:
            kinds = open_["adherence"]
            cells += [f"{kinds['all']:.3f}"] + [
                f"{kinds[k]:.3f}" for k in ("colour and shape", "no colour", "shape only", "random subset")
            ]
            cells += [f"{open_['open_tv']['mean']:.3f}", f"{open_['rejected']:.3f}", f"{open_['fidelity']:.2f}"]
            cells += (
                [f"{kinds['all'] / first_open['adherence']['all']:.3f}",
                 f"{open_['open_tv']['mean'] - first_open['open_tv']['mean']:+.3f}",
                 f"{open_['fidelity'] / first_open['fidelity']:.2f}"]
                if first_open else ["", "", ""]
            )  # fmt: skip
        else:
            cells += [""] * 11
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--row", action="append", required=True, help="`label|full.json|open.json` (either file may be empty)."
    )
    parser.add_argument("--title", default="", help="A line above the table (how the records were made).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for spec in args.row:
        parts = spec.split("|")
        if len(parts) != 3:
            parser.error(f"--row {spec!r} must be `label|full.json|open.json`.")
        rows.append((parts[0], read_record(parts[1]), read_record(parts[2])))
    lines = ([args.title, ""] if args.title else []) + table(rows)
    write_report(args.out, lines, {label: {"full": full, "open": open_} for label, full, open_ in rows})


if __name__ == "__main__":
    main()
