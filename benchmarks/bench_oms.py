#!/usr/bin/env python
"""One More Step on ShapesWorld: brightness, no harm, low-frequency control and cost, in front of the teacher and
the one-step SNOOPI student, each with its default sampler, with and without the OMS module.

    python benchmarks/bench_oms.py --oms shapes-oms --n 1000 --seeds 0 1 2 --teacher-seeds 0 \\
        --out benchmarks/results/oms.md

- quality: `evaluate_pipeline` on `--n` evaluation prompts (what `fastgen eval --model M [--oms O] --n N --seed S`
  measures): background brightness error on black/white prompts, all-attributes adherence, `shapes_fd`. Image i of
  a seed starts from the same generator with and without OMS, and OMS keeps the base's noise (it adds to it).
- control: the same prompts with the background phrase removed; with OMS, the full caption (which names the
  background) is the OMS prompt. Share of images whose judged background is the named one (chance 20%), against
  the base on the background-free prompt alone.
- cost: the full pipeline call (text encoding, sampling, decode) on batches of `--speed-batch` prompts, with and
  without OMS, interleaved in one run; the ratio is the median of the per-round ratios.

Each measured row is kept in `--cache` (JSON), so an interrupted run resumes and rows can be computed while others
are pending; the markdown table and its JSON record are written from the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from report import write_report

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.shapes import evaluation_prompts
from fastgen_diffusers.shapes.captions import BACKGROUNDS, make_caption
from fastgen_diffusers.shapes.evaluate import evaluate_pipeline, image_generator
from fastgen_diffusers.shapes.judge import ShapesJudge
from fastgen_diffusers.shapes.metrics import attribute_adherence, brightness_error
from fastgen_diffusers.shapes.render import render_attributes
from fastgen_diffusers.training.data import images_to_tensor
from fastgen_diffusers.training.validation import save_image_grid

BASES = ("shapes-teacher", "shapes-snoopi")
ATTRIBUTES = ("all", "shape", "colour", "size", "position", "background")


def default_settings(model: str) -> dict[str, Any]:
    """The model's default sampler, from its fastgen.json."""
    defaults = read_fastgen_metadata(resolve_model_location(model)).get("default_inference", {})
    return {k: defaults[k] for k in ("num_inference_steps", "guidance_scale") if k in defaults}


def load(model: str, oms: str | None) -> Any:
    pipe = FastPipeline.from_pretrained(model, oms=oms)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def background_free(prompt) -> str:
    return make_caption(dataclasses.replace(prompt.attributes, background=None))


def generate(pipe, prompts: list[str], seed: int, batch_size: int, oms_prompts: list[str] | None, **settings):
    """Image i from `image_generator(seed, i)`, in batches; `oms_prompts[i]` goes with prompt i."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        extra = {"oms_prompt": oms_prompts[start : start + batch_size]} if oms_prompts is not None else {}
        generators = [image_generator(seed, start + i) for i in range(len(batch))]
        images += pipe(prompt=batch, generator=generators, **settings, **extra).images
    return images


def quality_row(pipe, judge, n: int, seed: int, batch_size: int, settings: dict) -> dict[str, Any]:
    result = evaluate_pipeline(pipe, judge, num_prompts=n, seed=seed, batch_size=batch_size, **settings)
    keys = ("adherence", "rejected", "fidelity", "drawing_fd", "shapes_fd", "brightness_error")
    return {key: result[key] for key in keys}


def control_row(pipe, judge, n: int, seed: int, batch_size: int, settings: dict, with_oms: bool) -> dict[str, Any]:
    """Background-free prompts; with OMS, the full caption as OMS prompt. How often the named background appears."""
    prompts = evaluation_prompts(n, seed=seed)
    base_prompts = [background_free(p) for p in prompts]
    oms_prompts = [p.caption for p in prompts] if with_oms else None
    predicted = judge.read(generate(pipe, base_prompts, seed, batch_size, oms_prompts, **settings))
    named = [p.attributes.background for p in prompts]
    follows = [q.background == b for q, b in zip(predicted, named)]
    levels = list(BACKGROUNDS)
    within_one = [q.background in levels and abs(levels.index(q.background) - levels.index(b)) <= 1 for q, b in zip(predicted, named)]
    rest = attribute_adherence(predicted, [dataclasses.replace(p.attributes, background=None) for p in prompts])
    return {
        "follows_named_background": float(np.mean(follows)),
        "follows_by_background": {b: float(np.mean([f for f, c in zip(follows, named) if c == b])) for b in levels},
        "within_one_grey_level": float(np.mean(within_one)),
        "adherence_without_background": rest,
    }


@torch.no_grad()
def vae_floor_row(n: int, seed: int) -> dict[str, Any]:
    """Brightness error of real images and of their VAE reconstructions: what decoding alone costs, OMS or not."""
    vae = AutoencoderKL.from_pretrained(resolve_model_location("shapes-teacher"), subfolder="vae")
    prompts = [p for p in evaluation_prompts(n, seed=seed) if p.attributes.background in ("black", "white")]
    real = [render_attributes(p.attributes, p.seed) for p in prompts]
    decoded = (vae.decode(vae.encode(images_to_tensor(real)).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    attributes = [p.attributes for p in prompts]
    return {"real": brightness_error(real, attributes), "vae_reconstruction": brightness_error(decoded, attributes),
            "images": len(prompts)}  # fmt: skip


def cost_row(base, oms_pipe, settings: dict, oms_settings: dict, batch: int, repeats: int) -> dict[str, Any]:
    """Seconds per batch with and without OMS, interleaved (after one warm-up round), and their median ratio."""
    prompts = [p.caption for p in evaluation_prompts(batch, seed=1)]
    without, with_oms = [], []
    for round_index in range(repeats + 1):
        for pipe, seconds, extra in ((base, without, {}), (oms_pipe, with_oms, oms_settings)):
            start = time.perf_counter()
            generate(pipe, prompts, round_index, batch, None, **settings, **extra)
            if round_index > 0:
                seconds.append(time.perf_counter() - start)
    ratios = [w / b for w, b in zip(with_oms, without)]
    return {
        "seconds_without": without,
        "seconds_with": with_oms,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


class Cache:
    """Rows by key in a JSON file, written atomically after each row."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute) -> dict[str, Any]:
        if key not in self.rows:
            print(f"computing {key}", flush=True)
            start = time.perf_counter()
            self.rows[key] = {**compute(), "wall_seconds": time.perf_counter() - start}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps(self.rows, indent=1))
            os.replace(partial, self.path)
        return self.rows[key]


def spread(values: list[float], digits: int) -> str:
    """Mean, with min-max over seeds when there are several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def make_figures(oms: str, out_dir: Path, oms_settings: dict[str, Any]) -> None:
    """Black and white prompts with and without OMS, and OMS-prompt control of the background, for both bases."""
    prompts = [p for p in evaluation_prompts(200, seed=0) if p.attributes.background in ("black", "white")][:8]
    control = evaluation_prompts(4, seed=0)
    rows, control_rows = [], []
    for model in BASES:
        settings = default_settings(model)
        pipe = load(model, oms)
        captions = [p.caption for p in prompts]
        rows += generate(pipe, captions, 0, 64, None, **settings, oms=False)
        rows += generate(pipe, captions, 0, 64, None, **settings, **oms_settings)
        for p in control:
            base_prompt = background_free(p)
            control_rows += generate(pipe, [base_prompt], 0, 1, None, **settings, oms=False)
            for background in BACKGROUNDS:
                named = make_caption(dataclasses.replace(p.attributes, background=background))
                control_rows += generate(pipe, [base_prompt], 0, 1, [named], **settings, **oms_settings)
    save_image_grid(rows, out_dir / "oms_black_white.png", columns=len(prompts))
    save_image_grid(control_rows, out_dir / "oms_control.png", columns=1 + len(BACKGROUNDS))
    lines = ["black/white grid: rows = teacher without OMS, teacher with OMS, snoopi without, snoopi with; prompts:"]
    lines += [f"  {p.caption}" for p in prompts]
    lines += ["control grid: per row, the prompt without background; columns = no OMS, then OMS prompt naming "
              f"{', '.join(BACKGROUNDS)}; rows = teacher x {len(control)} prompts, then snoopi; prompts:"]
    lines += [f"  {background_free(p)}" for p in control]
    (out_dir / "oms_figures.txt").write_text("\n".join(lines) + "\n")


def plan(args: argparse.Namespace, model: str) -> tuple[list[int], int, int, int]:
    """Seeds, quality prompts, control prompts and speed batch for `model` (the teacher's may be smaller: 25 steps)."""
    if model == "shapes-teacher":
        return args.teacher_seeds, args.teacher_n, args.teacher_control_n, args.teacher_speed_batch
    return args.seeds, args.n, args.control_n, args.speed_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oms", default="shapes-oms", help="The OMS module (embedded name or folder).")
    parser.add_argument("--oms-guidance-scale", type=float, default=None,
                        help="CFG on the OMS module (default: the module's stored scale).")
    parser.add_argument("--oms-noise-mean", choices=["keep", "remove"], default=None,
                        help="Keep or remove the base noise's spatial mean (default: the module's stored choice).")
    parser.add_argument("--n", type=int, default=1000, help="Evaluation prompts per quality row.")
    parser.add_argument("--control-n", type=int, default=500, help="Background-free prompts per control row.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds for shapes-snoopi's rows.")
    parser.add_argument("--teacher-seeds", type=int, nargs="+", default=[0], help="Seeds for the teacher's rows.")
    parser.add_argument("--teacher-n", type=int, default=None, help="The teacher's --n (default: --n).")
    parser.add_argument("--teacher-control-n", type=int, default=None, help="The teacher's --control-n.")
    parser.add_argument("--teacher-speed-batch", type=int, default=None, help="The teacher's --speed-batch.")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES, help="Bases to measure now.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", nargs="*", default=["quality", "control", "cost"],
                        choices=["quality", "control", "cost", "figures", "floor"])  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=["none", "oms"], choices=["none", "oms"],
                        help="Rows to measure now: without OMS, with it (cost and figures need 'oms').")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results/oms_rows.json"))
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="Other processes' caches, read for the table.")
    parser.add_argument("--no-table", action="store_true", help="Measure only; write the table in a later run.")
    parser.add_argument("--figures-dir", type=Path, default=Path("docs/images"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/oms.md"))
    args = parser.parse_args()
    args.teacher_n = args.teacher_n or args.n
    args.teacher_control_n = args.teacher_control_n or args.control_n
    args.teacher_speed_batch = args.teacher_speed_batch or args.speed_batch

    cache = Cache(args.cache)
    judge = ShapesJudge.from_pretrained()
    oms_settings = {"oms_guidance_scale": args.oms_guidance_scale}
    tag = f"{args.oms}|cfg{args.oms_guidance_scale if args.oms_guidance_scale is not None else '-stored'}"
    if args.oms_noise_mean is not None:
        oms_settings["remove_noise_mean"] = args.oms_noise_mean == "remove"
        tag += f"|noise-mean-{args.oms_noise_mean}"
    with_oms = "oms" in args.variants
    off = {"oms": False} if with_oms else {}  # the base alone (OMS off runs exactly the base)
    for model in args.bases if args.stages else []:  # no stages: only the table
        settings = default_settings(model)
        seeds, n, control_n, speed_batch = plan(args, model)
        pipe = load(model, args.oms if with_oms else None)
        for seed in seeds:
            if "quality" in args.stages and "none" in args.variants:
                cache.get(f"quality|{model}|none|{seed}|{n}",
                          lambda: quality_row(pipe, judge, n, seed, args.batch_size, {**settings, **off}))
            if "quality" in args.stages and with_oms:
                cache.get(f"quality|{model}|{tag}|{seed}|{n}",
                          lambda: quality_row(pipe, judge, n, seed, args.batch_size, {**settings, **oms_settings}))
            if "control" in args.stages and "none" in args.variants:
                cache.get(f"control|{model}|none|{seed}|{control_n}",
                          lambda: control_row(pipe, judge, control_n, seed, args.batch_size, {**settings, **off},
                                              with_oms=False))
            if "control" in args.stages and with_oms:
                cache.get(f"control|{model}|{tag}|{seed}|{control_n}",
                          lambda: control_row(pipe, judge, control_n, seed, args.batch_size,
                                              {**settings, **oms_settings}, with_oms=True))
        if "cost" in args.stages and with_oms:
            cache.get(f"cost|{model}|{tag}|{speed_batch}|{args.repeats}",
                      lambda: cost_row(pipe.base_pipeline, pipe, settings, oms_settings, speed_batch, args.repeats))
    if "floor" in args.stages:
        cache.get(f"floor|{args.n}", lambda: vae_floor_row(args.n, 0))
    if "figures" in args.stages and with_oms:
        make_figures(args.oms, args.figures_dir, oms_settings)
    if not args.no_table:
        for other in [m for m in args.merge if m.is_file()]:
            cache.rows = {**json.loads(other.read_text()), **cache.rows}
        write_table(args, cache, tag)


def seed_rows(rows: dict, stage: str, model: str, variant: str, seeds: list[int], n: int) -> list[dict] | None:
    """The cached rows of one table line, one per seed; None while any seed is still unmeasured."""
    found = [rows.get(f"{stage}|{model}|{variant}|{s}|{n}") for s in seeds]
    return None if any(r is None for r in found) else found


def write_table(args, cache: Cache, tag: str) -> None:
    rows = cache.rows
    record: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    lines = [
        f"OMS module `{args.oms}` (OMS guidance {args.oms_guidance_scale if args.oms_guidance_scale is not None else 'as the module stores'}, base noise mean:"
        f" {args.oms_noise_mean or 'as the module stores'}) in front of each base at its default"
        " sampler (teacher: 25 DDIM steps, CFG 4; shapes-snoopi: one step). A range is min-max over seeds.",
        "",
        "| base | OMS | seeds x prompts | brightness error | all | shape | colour | size | position | background"
        " | rejected | fidelity | drawing_fd | shapes_fd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in BASES:
        seeds, n, control_n, _ = plan(args, model)
        for variant in ("none", tag):
            found = seed_rows(rows, "quality", model, variant, seeds, n)
            if found is None:
                continue
            record["rows"][f"quality|{model}|{variant}"] = found
            cells = [f"{len(seeds)} x {n}", spread([r["brightness_error"] for r in found], 2)]
            cells += [spread([r["adherence"][a] for r in found], 3) for a in ATTRIBUTES]
            for key, digits in (("rejected", 3), ("fidelity", 2), ("drawing_fd", 1), ("shapes_fd", 1)):
                # rows cached before a measure was recorded leave its cell empty
                cells.append(spread([r[key] for r in found], digits) if all(key in r for r in found) else "")
            lines.append(f"| {model} | {'with' if variant != 'none' else 'without'} | " + " | ".join(cells) + " |")
    floor = rows.get(f"floor|{args.n}")
    if floor is not None:
        record["rows"]["floor"] = floor
        lines += ["", f"Floor: on the {floor['images']} black/white prompts among {args.n}, real images score"
                  f" {floor['real']:.2f} and their reconstructions by the shared VAE {floor['vae_reconstruction']:.2f}"
                  " grey levels: decoding alone costs that much, with or without OMS."]
    lines += [
        "",
        "Control: evaluation prompts with the background phrase removed; with OMS, the full caption (naming the"
        " background) is the OMS prompt. Chance is 20% (5 backgrounds); 'within one' counts a neighbouring grey level.",
        "",
        "| base | OMS prompt | seeds x prompts | background = the named one | within one level | black | dark gray"
        " | gray | light gray | white | all other attributes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in BASES:
        seeds, n, control_n, _ = plan(args, model)
        for variant in ("none", tag):
            found = seed_rows(rows, "control", model, variant, seeds, control_n)
            if found is None:
                continue
            record["rows"][f"control|{model}|{variant}"] = found
            cells = [f"{len(seeds)} x {control_n}", spread([r["follows_named_background"] for r in found], 3),
                     spread([r["within_one_grey_level"] for r in found], 3)]
            cells += [spread([r["follows_by_background"][b] for r in found], 2) for b in BACKGROUNDS]
            cells += [spread([r["adherence_without_background"]["all"] for r in found], 3)]
            label = "full caption" if variant != "none" else "none (no OMS)"
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| base | images per batch | seconds per batch without OMS | with OMS | ratio (median of rounds) | range |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for model in BASES:
        found = [r for k, r in rows.items() if k.startswith(f"cost|{model}|{tag}|")]  # any batch and repeats
        if not found:
            continue
        row = found[-1]
        record["rows"][f"cost|{model}"] = row
        lines.append(
            f"| {model} | {row['batch']} ({row['repeats']} rounds) | {statistics.median(row['seconds_without']):.3f} |"
            f" {statistics.median(row['seconds_with']):.3f} | {row['ratio_median']:.3f}x |"
            f" {row['ratio_min']:.3f}-{row['ratio_max']:.3f} |"
        )
    lines.append("\nCost: interleaved rounds after a warm-up, the full pipeline call (text encoding,"
                 " sampling, decode) with and without OMS, on this machine's CPU (shared with other jobs).")
    write_report(args.out, lines, record)


if __name__ == "__main__":
    main()
