#!/usr/bin/env python
"""Pick each guided method's scale from `bench_ppap.py` sweeps, by the rule the PPAP tables use.

The rule: among the swept scales, the one with the best target rate that keeps every stated attribute within
`--tolerance` (3 points) of no guidance; when no scale does, the smallest one swept. Sweeps run on seed 1 and the
tables on seed 0, so the choice never sees the prompts it is judged on. Prints `--method-scale` arguments for
`bench_ppap.py`.

    python benchmarks/choose_ppap_scales.py --task classification sweep-a.json sweep-b.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NO_GUIDANCE = "no guidance"


def keeps_attributes(row: dict, baseline: dict, tolerance: float) -> bool:
    """Whether no stated attribute of `row` fell more than `tolerance` below the unguided `baseline`."""
    return all(baseline["stated"][name] - rate <= tolerance for name, rate in row["stated"].items())


def choose_scales(records: list[dict], task: str, tolerance: float = 0.03) -> dict[str, float]:
    """Method name -> chosen scale, over every (method, scale) row of `records` (`bench_ppap.py --json` output).

    The unguided baseline is taken from the first record that has it; each record's method scale is its
    `method_scales` entry, else its global `scale`.
    """
    baselines = [
        record["tasks"][task][NO_GUIDANCE] for record in records if NO_GUIDANCE in record["tasks"].get(task, {})
    ]
    if not baselines:
        raise ValueError(f"No sweep holds a {NO_GUIDANCE!r} row for task {task!r}; run one without `--methods`.")
    baseline = baselines[0]
    tried: dict[str, list[tuple[float, float, bool]]] = {}
    for record in records:
        for method, row in record["tasks"].get(task, {}).items():
            if method == NO_GUIDANCE:
                continue
            scale = record.get("method_scales", {}).get(method, record["scale"])
            tried.setdefault(method, []).append(
                (scale, row["target_rate"], keeps_attributes(row, baseline, tolerance))
            )
    chosen = {}
    for method, rows in tried.items():
        allowed = [(rate, scale) for scale, rate, ok in rows if ok]
        chosen[method] = max(allowed)[1] if allowed else min(scale for scale, _, _ in rows)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "sweeps", type=Path, nargs="+", help="`bench_ppap.py` JSON records (one scale per method each)."
    )
    parser.add_argument("--task", choices=["classification", "regression"], required=True)
    parser.add_argument("--tolerance", type=float, default=0.03, help="Largest allowed drop of a stated attribute.")
    args = parser.parse_args()
    chosen = choose_scales([json.loads(path.read_text()) for path in args.sweeps], args.task, args.tolerance)
    print("--method-scale " + " ".join(f'"{method}={scale:g}"' for method, scale in chosen.items()))


if __name__ == "__main__":
    main()
