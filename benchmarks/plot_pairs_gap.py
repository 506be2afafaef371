#!/usr/bin/env python
"""The open-prompt gap of a reflowed model against the number of reflow pairs, or of training steps, as a PNG and a
table.

Each point is one `fastgen eval --open --json` record of a model trained on the first N pairs
(`train_rectified_flow.py --max_pairs N`), or for N steps (`--x-axis steps`); the teacher's record of the same
prompts is the line the gap is measured from. Reads records only, so the plot can be redrawn without sampling again.

    python benchmarks/plot_pairs_gap.py --teacher runs/eval/teacher_open1000.json \
        --point 0:runs/eval/shapes-2rf_open1000.json --point 750:runs/gap/2rf-p750_open1000.json ... \
        --out docs/images/open_pairs_gap.png --table benchmarks/results/open_pairs_gap.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_point(spec: str) -> tuple[int, dict]:
    """`N:PATH[:LABEL]` -> (N, the eval record at PATH, its model named LABEL if given)."""
    count, _, rest = spec.partition(":")
    path, _, label = rest.partition(":")
    if not path or not count.isdigit():
        raise argparse.ArgumentTypeError(
            f"--point must be N:PATH[:LABEL] with N a whole number (of pairs or steps), got {spec!r}."
        )
    record = json.loads(Path(path).read_text())
    if label:
        record["model"] = label
    return int(count), record


def gap_rows(teacher: dict, points: list[tuple[int, dict]]) -> list[dict]:
    """Per point: stated-attribute adherence, its ratio to the teacher's, open TV and its excess over the teacher's."""
    rows = []
    for count, record in sorted(points, key=lambda point: point[0]):
        if record["n"] != teacher["n"] or record["seed"] != teacher["seed"]:
            raise ValueError(
                f"{record['model']} was judged on n={record['n']}, seed={record['seed']}; the teacher on "
                f"n={teacher['n']}, seed={teacher['seed']}: the same prompts are needed for a gap."
            )
        rows.append(
            {
                "x": count,
                "model": record["model"],
                "stated": record["adherence"]["all"],
                "stated_ratio": record["adherence"]["all"] / teacher["adherence"]["all"],
                "open_tv": record["open_tv"]["mean"],
                "tv_excess": record["open_tv"]["mean"] - teacher["open_tv"]["mean"],
                "rejected": record["rejected"],
            }
        )
    return rows


X_AXES = {"pairs": "reflow pairs", "steps": "training steps"}


def write_table(rows: list[dict], teacher: dict, path: Path, x_axis: str = "pairs") -> None:
    lines = [
        f"Open prompts (n = {teacher['n']}, seed {teacher['seed']}): the teacher's stated adherence is "
        f"{teacher['adherence']['all']:.3f}, its open TV {teacher['open_tv']['mean']:.3f}.",
        "",
        f"| {X_AXES[x_axis]} | model | stated | stated / teacher | open TV | TV - teacher | rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['x']} | {row['model']} | {row['stated']:.3f} | {row['stated_ratio']:.3f} | "
            f"{row['open_tv']:.3f} | {row['tv_excess']:+.3f} | {row['rejected']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], teacher: dict, path: Path, title: str, x_axis: str = "pairs") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [max(row["x"], 1) for row in rows]  # 0 sits at 1 on the log axis
    x_label = f"{X_AXES[x_axis]} (0 drawn at 1)"
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [row["stated"] for row in rows], "o-", label="2-RF (4 steps)")
    left.axhline(teacher["adherence"]["all"], color="k", linestyle="--", label="teacher")
    left.axhline(0.95 * teacher["adherence"]["all"], color="grey", linestyle=":", label="goal: 0.95x teacher")
    left.set(xscale="log", xlabel=x_label, ylabel="stated attributes right")
    right.plot(xs, [row["open_tv"] for row in rows], "o-", label="2-RF (4 steps)")
    right.axhline(teacher["open_tv"]["mean"], color="k", linestyle="--", label="teacher")
    right.axhline(teacher["open_tv"]["mean"] + 0.03, color="grey", linestyle=":", label="goal: teacher + 0.03")
    right.set(xscale="log", xlabel=x_label, ylabel="open-attribute TV (lower is better)")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{title} (open prompts, n = {teacher['n']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="The teacher's `fastgen eval --open --json` record.")
    parser.add_argument("--point", type=read_point, action="append", required=True, help="N:PATH[:LABEL], repeated.")
    parser.add_argument("--out", type=Path, required=True, help="The PNG to write.")
    parser.add_argument("--table", type=Path, help="Also write the points as a markdown table.")
    parser.add_argument("--x-axis", choices=sorted(X_AXES), default="pairs", help="What N of each point counts.")
    parser.add_argument("--title", default=None, help="Plot title (default: the gap against the x axis).")
    args = parser.parse_args()
    teacher = json.loads(args.teacher.read_text())
    rows = gap_rows(teacher, args.point)
    title = args.title or f"Open-prompt gap against the number of {X_AXES[args.x_axis]}"
    plot(rows, teacher, args.out, title, args.x_axis)
    if args.table:
        write_table(rows, teacher, args.table, args.x_axis)
    for row in rows:
        print(f"{row['x']:>6} {args.x_axis}: stated {row['stated']:.3f} ({row['stated_ratio']:.2f}x), TV {row['tv_excess']:+.3f}")


if __name__ == "__main__":
    main()
