#!/usr/bin/env python
"""ShapesWorld quality and speed of the embedded models in one run: the README's results table.

For each configuration (a model and its sampling settings) it measures, with the package's own metrics:
adherence on `--n` evaluation prompts (all attributes, and each one), `shapes_fd` against real images of the same
prompts, and images per second. Speed is timed separately from the quality run, interleaved (A B C A B C ...) on
batches of `--speed-batch` prompts so that machine noise hits every configuration alike, and reported as a ratio
to the first configuration (the teacher at its default sampler). With `--negative`, one-step configurations also
get the negative-prompt measurement of `fastgen eval --negative` (NASA).

    python benchmarks/bench_shapes.py  # all embedded models, n = 1000; writes benchmarks/results/shapes.md
    python benchmarks/bench_shapes.py --n 100 --repeats 1 --out /tmp/shapes.md
    python benchmarks/bench_shapes.py --negative \
        --config "fixed-scale VSD one-step|runs/shapes-vsd-fixed|guidance_scale=1"  # rows added after the default ones

A configuration is `label|model|key=value,...`: keys are pipeline call arguments (`num_inference_steps`,
`guidance_scale`, `timesteps`), and `timestep_spacing`, which replaces the scheduler's. The teacher's 1-step row
uses "trailing" spacing so that its single DDIM step starts at t = 999; SD's default "leading" spacing would
start it at t = 1, from pure noise.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from report import write_report

from fastgen_diffusers import FastPipeline, assets
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.shapes import evaluation_prompts
from fastgen_diffusers.shapes.evaluate import evaluate_open_prompts, evaluate_pipeline, evaluation_floors, generate_images
from fastgen_diffusers.shapes.judge import ShapesJudge
from fastgen_diffusers.shapes.captions import ATTRIBUTE_NAMES
from fastgen_diffusers.shapes.open_prompts import PROMPT_KINDS
from fastgen_diffusers.shapes.negative_eval import evaluate_negative_prompts, format_negative_table

DEFAULT_CONFIGS = [
    "teacher, 25 DDIM steps, CFG 4 (default)|shapes-teacher|num_inference_steps=25,guidance_scale=4",
    "teacher, 1 DDIM step, CFG 4|shapes-teacher|num_inference_steps=1,guidance_scale=4,timestep_spacing=trailing",
    "teacher, 1 DDIM step, no CFG|shapes-teacher|num_inference_steps=1,guidance_scale=1,timestep_spacing=trailing",
    "2-RF, 4 Euler steps|shapes-2rf|num_inference_steps=4,guidance_scale=1",
    "2-RF, 1 Euler step|shapes-2rf|num_inference_steps=1,guidance_scale=1",
    "InstaFlow one-step|shapes-instaflow|num_inference_steps=1,guidance_scale=1",
    "SNOOPI one-step (PG-SB)|shapes-snoopi|guidance_scale=1",
]
ONE_STEP_METHODS = ("instaflow", "snoopi")


def parse_config(text: str) -> dict[str, Any]:
    """`label|model|key=value,...` -> {"label", "model", "call": {...}, "timestep_spacing"}."""
    parts = text.split("|")
    if len(parts) != 3:
        raise ValueError(f"`--config` must look like 'label|model|key=value,...', got {text!r}.")
    label, model, settings = parts
    call: dict[str, Any] = {}
    spacing = None
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key == "timestep_spacing":
            spacing = value
        elif key == "num_inference_steps":
            call[key] = int(value)
        elif key == "guidance_scale":
            call[key] = float(value)
        elif key == "timesteps":
            call[key] = [int(t) for t in value.split("/")]
        else:
            raise ValueError(
                f"`--config` key {key!r} is not one of num_inference_steps, guidance_scale, timesteps,"
                " timestep_spacing."
            )
    return {"label": label, "model": model, "call": call, "timestep_spacing": spacing}


def load(config: dict[str, Any]):
    pipe = FastPipeline.from_pretrained(config["model"])
    pipe.set_progress_bar_config(disable=True)
    if config["timestep_spacing"] is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, timestep_spacing=config["timestep_spacing"]
        )
    return pipe


def time_interleaved(pipes: list, configs: list[dict[str, Any]], batch: int, repeats: int) -> list[float]:
    """Median images per second of each configuration over `repeats` interleaved rounds (after one warm-up)."""
    prompts = [p.caption for p in evaluation_prompts(batch, seed=1)]
    seconds: list[list[float]] = [[] for _ in configs]
    for round_index in range(repeats + 1):
        for i, (pipe, config) in enumerate(zip(pipes, configs)):
            start = time.perf_counter()
            generate_images(pipe, prompts, seed=round_index, batch_size=batch, **config["call"])
            if round_index > 0:  # round 0 warms up
                seconds[i].append(time.perf_counter() - start)
    return [batch / statistics.median(s) for s in seconds]


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def format_open_table(configs, open_results, floors, n: int) -> list[str]:
    """The open-prompt table: stated-attribute adherence per kind, open-attribute TV, rejects and fidelity."""
    kinds = list(PROMPT_KINDS)
    attributes = list(ATTRIBUTE_NAMES)
    lines = [
        f"### Open prompts: {n} partial prompts ({', '.join(kinds)} in turn), seed 0",
        "",
        "| configuration | stated all | " + " | ".join(kinds) + " | open TV mean | "
        + " | ".join(f"TV {a}" for a in attributes)
        + " | rejected | fidelity | stated / first | TV - first | fidelity / first |",
        "|---" * (len(kinds) + len(attributes) + 8) + "|",
    ]
    reference = open_results[0]
    rows = [(c["label"], r) for c, r in zip(configs, open_results)]
    rows += [("real images (noise floor)", floors["real"]["open"]), ("teacher VAE reconstructions", floors["vae"]["open"])]
    for label, r in rows:
        a, tv = r["adherence"], r["open_tv"]
        lines.append(
            f"| {label} | {a['all']:.3f} | " + " | ".join(f"{a[k]:.3f}" for k in kinds)
            + f" | {tv['mean']:.3f} | " + " | ".join(f"{tv.get(x, float('nan')):.3f}" for x in attributes)
            + f" | {r['rejected']:.3f} | {r['fidelity']:.2f} | {ratio(a['all'], reference['adherence']['all']):.3f}"
            f" | {tv['mean'] - reference['open_tv']['mean']:+.3f} | {ratio(r['fidelity'], reference['fidelity']):.2f} |"
        )
    lines += [
        "",
        "stated: every attribute the prompt names judged right (a rejected image is wrong). TV: total-variation"
        " distance of the judged values of an attribute the prompt leaves open (rejected images in their own bin)"
        " from the data's uniform distribution, over the prompts that leave it open; the real images' row is the"
        " sampling-noise floor at this n.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", action="append", default=[], help="A further configuration after the default ones; repeatable."
    )
    parser.add_argument("--no-defaults", action="store_true", help="Measure only the --config rows.")
    parser.add_argument("--n", type=int, default=1000, help="Evaluation prompts per configuration.")
    parser.add_argument("--open-n", type=int, default=1000, help="Open (partial) prompts per configuration; 0: none.")
    parser.add_argument("--negative-n", type=int, default=200, help="Colour-free prompts for `--negative`.")
    parser.add_argument("--negative", action="store_true", help="Also measure NASA negative prompts (one-step).")
    parser.add_argument("--speed-batch", type=int, default=64, help="Prompts per timed call.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds (median).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes.md"))
    args = parser.parse_args()
    if args.n < 1 or args.speed_batch < 1 or args.repeats < 1 or args.open_n < 0:
        parser.error("--n, --speed-batch and --repeats must be at least 1, --open-n at least 0.")

    configs = [parse_config(c) for c in ([] if args.no_defaults else DEFAULT_CONFIGS) + args.config]
    if not configs:
        parser.error("--no-defaults needs at least one --config.")
    missing = [c["model"] for c in configs if not Path(c["model"]).exists() and c["model"] not in assets.names()]
    if missing:
        parser.error(f"--config: no model {missing}; embedded models are {assets.names()}.")
    judge = ShapesJudge.from_pretrained()
    pipes = [load(c) for c in configs]

    results, open_results = [], []
    for pipe, config in zip(pipes, configs):
        print(f"quality: {config['label']}", flush=True)
        results.append(evaluate_pipeline(pipe, judge, num_prompts=args.n, seed=0, **config["call"]))
        if args.open_n:
            print(f"open prompts: {config['label']}", flush=True)
            open_results.append(evaluate_open_prompts(pipe, judge, num_prompts=args.open_n, seed=0, **config["call"]))
    print("floors: real images and the teacher VAE's reconstructions", flush=True)
    floors = evaluation_floors(judge, FastPipeline.from_pretrained("shapes-teacher").vae, args.n, max(args.open_n, 1))
    print("speed (interleaved)", flush=True)
    speeds = time_interleaved(pipes, configs, args.speed_batch, args.repeats)

    reference = results[0]
    lines = [
        (
            f"ShapesWorld, {args.n} evaluation prompts, seed 0; speed: batches of {args.speed_batch}, median of"
            f" {args.repeats} interleaved rounds, {torch.get_num_threads()} CPU threads"
            f" ({platform.processor() or platform.machine()})."
        ),
        "Ratios are to the first row, measured in this run.",
        "",
        (
            "| configuration | all | shape | colour | size | position | background | held-out all | rejected"
            " | fidelity | drawing_fd | shapes_fd | all / first | fidelity / first | images/s | speed-up |"
        ),
        "|---" * 16 + "|",
    ]
    for config, result, speed in zip(configs, results, speeds):
        a = result["adherence"]
        held_out = result["held_out_adherence"].get("all", float("nan"))
        lines.append(
            f"| {config['label']} | {a['all']:.3f} | {a['shape']:.3f} | {a['colour']:.3f} | {a['size']:.3f}"
            f" | {a['position']:.3f} | {a['background']:.3f} | {held_out:.3f} | {result['rejected']:.3f}"
            f" | {result['fidelity']:.2f} | {result['drawing_fd']:.2f} | {result['shapes_fd']:.1f}"
            f" | {ratio(a['all'], reference['adherence']['all']):.3f} | {ratio(result['fidelity'], reference['fidelity']):.2f}"
            f" | {speed:.1f} | {speed / speeds[0]:.1f}x |"
        )
    for name, label in (("real", "real images (floor)"), ("vae", "teacher VAE reconstructions of them (floor)")):
        floor = floors[name]["full"]
        lines.append(
            f"| {label} | {floor['adherence']:.3f} | | | | | | | {floor['rejected']:.3f} | {floor['fidelity']:.2f}"
            " | | | | | | |"
        )
    lines += [
        "",
        "rejected: share of images the judge rejects (no single clean shape; they count as wrong). fidelity: mean RMS"
        " distance (grey levels) to the nearest clean drawing of the shape the image shows. drawing_fd: Frechet"
        " distance of the fitted drawings' parameters from the real images'. shapes_fd: the judge CNN's feature space"
        " (kept for comparison; see docs/open-prompts.md).",
    ]
    record = [
        {**c, **r, "images_per_second_interleaved": s, **({"open": o} if o else {})}
        for c, r, s, o in zip(configs, results, speeds, open_results or [None] * len(configs))
    ]
    record.append({"floors": floors})
    if open_results:
        lines += ["", *format_open_table(configs, open_results, floors, args.open_n)]

    if args.negative:
        for pipe, config in zip(pipes, configs):
            method = read_fastgen_metadata(resolve_model_location(config["model"])).get("method")
            if method not in ONE_STEP_METHODS:
                continue
            print(f"negative prompts: {config['label']}", flush=True)
            negative = evaluate_negative_prompts(pipe, judge, num_prompts=args.negative_n, seed=0, **config["call"])
            lines += [
                "",
                f"### {config['label']}: `negative_prompt` through NASA",
                "",
                format_negative_table(negative),
            ]
            record.append({"label": config["label"], "negative": negative})

    write_report(args.out, lines, record)


if __name__ == "__main__":
    main()
