#!/usr/bin/env python
"""Does a reflowed model reproduce its teacher's noise-to-latent map on new noises as well as on its training pairs?

A reflow student is trained to follow the teacher's map x0 -> T(x0, prompt) on a finite set of pairs. Sampled from
a pair's own noise and prompt, it should land on the pair's latent. This reports the per-pair latent error on pairs
the student trained on and on held-out pairs (more shards of the same generation, never trained on): a gap between
the two says the student memorises its pairs rather than learning the map, so more pairs are the remedy; a large
error on both says the fit itself is short (the objective or the capacity). Besides the mean and the median, the
share of "far" pairs (error above `--far`) counts the pairs where the student chose another image altogether, the
mode flips and blends that open prompts expose.

    python benchmarks/reflow_fit_gap.py --model shapes-2rf --steps 4 --pairs-dir runs/pairs-teacher \
        --fit-shards 0 --held-out-shards 12 --n 500 --json runs/fit_gap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets
import torch
from diffusers import DiffusionPipeline

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.training.reflow import load_pairs


def teacher_match_errors(
    pipe: DiffusionPipeline,
    pairs: datasets.Dataset,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 100,
) -> torch.Tensor:
    """Per pair: the mean squared latent error of the pipeline sampled from the pair's noise and prompt, shape (N,)."""
    pairs = pairs.with_format("torch")
    errors = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        with torch.no_grad():
            latents = pipe(
                list(batch["prompt"]),
                latents=batch["noise"].to(pipe.device, pipe.unet.dtype),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                output_type="latent",
            ).images
        errors.append((latents.float().cpu() - batch["latent"].float()).pow(2).flatten(1).mean(dim=1))
    return torch.cat(errors)


def summarize(errors: torch.Tensor, far: float) -> dict[str, float]:
    """Mean, median and the share of pairs whose error exceeds `far`."""
    return {
        "n": len(errors),
        "mean": errors.mean().item(),
        "median": errors.median().item(),
        "far_share": (errors > far).float().mean().item(),
    }


def load_shards(pairs_dir: str, shards: list[int], n: int) -> datasets.Dataset:
    """The first `n` pairs of the given complete shards, in shard order."""
    rows = load_pairs(pairs_dir, shards=shards)
    if len(rows) < n:
        raise ValueError(f"Shards {shards} hold {len(rows)} pairs, fewer than `--n` {n}.")
    return rows.select(range(n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder, Hub id or embedded name (e.g. shapes-2rf).")
    parser.add_argument("--pairs-dir", required=True, help="The teacher pairs (generate_reflow_pairs.py output).")
    parser.add_argument("--fit-shards", type=int, nargs="+", required=True, help="Shards the model trained on.")
    parser.add_argument("--held-out-shards", type=int, nargs="+", required=True, help="Shards it never saw.")
    parser.add_argument("--n", type=int, default=500, help="Pairs per set.")
    parser.add_argument("--steps", type=int, default=4, help="Sampling steps of the model.")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="The model's CFG (1: off, as 2-RF samples).")
    parser.add_argument("--far", type=float, default=0.2, help="Error above which a pair counts as a different image.")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="Also write the record here.")
    args = parser.parse_args(argv)
    if set(args.fit_shards) & set(args.held_out_shards):
        parser.error("`--fit-shards` and `--held-out-shards` must not share a shard.")
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be at least 1, got {getattr(args, name)}.")
    if args.far <= 0:
        parser.error(f"`--far` must be positive, got {args.far}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sets = {"fit": args.fit_shards, "held_out": args.held_out_shards}
    pairs = {name: load_shards(args.pairs_dir, shards, args.n) for name, shards in sets.items()}  # before the model
    pipe = FastPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    record = {"model": args.model, "steps": args.steps, "guidance_scale": args.guidance_scale, "far": args.far}
    for name, shards in sets.items():
        errors = teacher_match_errors(pipe, pairs[name], args.steps, args.guidance_scale, args.batch_size)
        record[name] = {"shards": shards, **summarize(errors, args.far)}
    print(
        "| model | steps | set | mean error | median error | far share |\n|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {args.model} | {args.steps} | {name} | {record[name]['mean']:.4f} | {record[name]['median']:.4f} | "
            f"{record[name]['far_share']:.3f} |"
            for name in ("fit", "held_out")
        )
    )
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
