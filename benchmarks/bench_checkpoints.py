#!/usr/bin/env python
"""Quality and NASA side effects of every checkpoint of a `train_snoopi.py` run, on validation prompts.

One-step students trained by VSD keep improving image quality for a while, but on ShapesWorld they also grow
more sensitive to NASA: the same negative prompt costs more shape adherence after 400 steps than after 200.
This table shows both curves for one run, so a release checkpoint can be picked on prompts other than the
reported ones (`--seed 1` here; the README reports seed 0). Each checkpoint's raw student is measured (the EMA
lives only in the final export), with the package's metrics: adherence and `shapes_fd` on `--n` evaluation
prompts, and `fastgen eval --negative` at each `--nasa-scale` on `--negative-n` colour-free prompts.

    python benchmarks/bench_checkpoints.py runs/shapes-snoopi-lora --nasa-scale 0.5 --nasa-scale 0.8 \
        --out benchmarks/results/snoopi_checkpoints.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import write_report

from fastgen_diffusers.shapes.evaluate import evaluate_pipeline
from fastgen_diffusers.shapes.judge import ShapesJudge
from fastgen_diffusers.shapes.negative_eval import OTHER_ATTRIBUTES, evaluate_negative_prompts
from fastgen_diffusers.training.checkpointing import checkpoint_step, list_checkpoints
from fastgen_diffusers.training.students import load_student_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="A `train_snoopi.py` output folder with checkpoint-N folders.")
    parser.add_argument("--n", type=int, default=200, help="Evaluation prompts for adherence and shapes_fd.")
    parser.add_argument("--negative-n", type=int, default=100, help="Colour-free prompts per NASA scale.")
    parser.add_argument("--nasa-scale", type=float, action="append", default=[], help="Repeatable; default 0.5.")
    parser.add_argument("--seed", type=int, default=1, help="Prompt seed: keep it apart from the reported seed 0.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoints.md"))
    args = parser.parse_args()
    checkpoints = list_checkpoints(args.run_dir)
    if not checkpoints:
        parser.error(f"run_dir {str(args.run_dir)!r} has no checkpoint-N folders.")
    if args.n < 1 or args.negative_n < 1:
        parser.error("--n and --negative-n must be at least 1.")
    scales = args.nasa_scale or [0.5]
    if any(scale <= 0 for scale in scales):
        parser.error(f"--nasa-scale must be above 0, got {scales}.")

    judge = ShapesJudge.from_pretrained()
    header = ["step", "all", "shapes_fd"]
    for scale in scales:
        header += [f"NASA {scale:g}: reduction"] + [f"{name} drop" for name in (*OTHER_ATTRIBUTES, "mean")]
    lines = [
        (
            f"`{args.run_dir.name}`, raw student at each checkpoint; adherence and shapes_fd on {args.n} evaluation"
            f" prompts, NASA on {args.negative_n} colour-free prompts (drops in points), seed {args.seed}."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    record = []
    for checkpoint in checkpoints:
        step = checkpoint_step(checkpoint)
        print(f"checkpoint {step}", flush=True)
        pipe = load_student_checkpoint(args.run_dir, checkpoint)
        pipe.set_progress_bar_config(disable=True)
        quality = evaluate_pipeline(pipe, judge, num_prompts=args.n, seed=args.seed, guidance_scale=1.0)
        row = [str(step), f"{quality['adherence']['all']:.3f}", f"{quality['shapes_fd']:.1f}"]
        negatives = {}
        for scale in scales:
            negative = evaluate_negative_prompts(
                pipe, judge, num_prompts=args.negative_n, seed=args.seed, guidance_scale=1.0, negative_attention={"scale": scale}
            )
            average = negative["average"]
            reduction = average["relative_reduction"]  # None when no image had the negated colours to begin with
            row.append("n/a" if reduction is None else f"{100 * reduction:.0f}%")
            row += [f"{average['adherence_drop_points'][name]:.1f}" for name in (*OTHER_ATTRIBUTES, "mean")]
            negatives[scale] = average
        lines.append("| " + " | ".join(row) + " |")
        record.append({"step": step, "quality": quality, "negative": negatives})

    write_report(args.out, lines, record)


if __name__ == "__main__":
    main()
