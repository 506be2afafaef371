"""PPAP on ShapesWorld: guided attribute accuracy per method, the stated attributes beside it, and guided cost.

For the classifier guide, prompts leave the shape out and each quarter of them is guided toward one shape; for the
centre regressor, prompts leave the position out and each quarter is guided toward one corner cell. Methods: no
guidance; the clean guide used naively (it reads the VAE's decoding of the noisy latent, gradient through the
decoder); a single expert over all noise levels; PPAP with its N experts. Same seeds for every method. Cost: the
sampling time with guidance over the time without, timed interleaved in this run on one batch.

    python benchmarks/bench_ppap.py --model shapes-teacher --n 1000 --figure docs/images/ppap_shapes-teacher.png
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastgen_diffusers import FastPipeline, assets
from fastgen_diffusers.guidance import DecodedGuide, PPAPGuidance
from fastgen_diffusers.guidance.shapesworld import bind_target, evaluate_guided, targets_for
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.pipelines.core import FastDiffusionPipeline
from fastgen_diffusers.shapes.dataset import evaluation_prompts
from fastgen_diffusers.shapes.judge import ShapesJudge

from report import write_report


RESULTS = Path(__file__).resolve().parent / "results"
# The saved guidance each method loads from the PPAP folder (None: no guidance; "naive" is built from the guide).
CLASSIFIER_METHODS = {"no guidance": None, "clean guide, naive": "naive", "single expert": "classifier-single-expert",
                      "PPAP": "classifier"}  # fmt: skip
REGRESSOR_METHODS = {"no guidance": None, "clean guide, naive": "naive", "PPAP": "regressor"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-teacher", help="The sampler: an embedded model or a folder.")
    parser.add_argument("--ppap", default="shapes-ppap", help="The PPAP folder (classifier/, regressor/, ...).")
    parser.add_argument("--task", choices=["classification", "regression", "both"], default="both")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--scale", type=float, default=1.0, help="Guidance scale of every guided method.")
    parser.add_argument("--grad-rms", type=float, default=None, help="Rescale each gradient to this RMS first.")
    parser.add_argument("--method-scale", nargs="+", default=[], metavar="METHOD=SCALE",
                        help="A scale for one method instead of --scale (each method's scale tuned on its own).")
    parser.add_argument("--methods", nargs="+", default=None, help="Only these rows (e.g. 'no guidance' PPAP).")
    parser.add_argument("--timing-reps", type=int, default=3, help="0 skips the cost measurement.")
    parser.add_argument("--timing-batch-size", type=int, default=None, help="Default: --batch-size.")
    parser.add_argument("--figure", type=Path, default=None, help="A PNG grid: one row per method, 2 images per target.")
    parser.add_argument("--out", type=Path, default=None, help="Default: results/ppap_<model>_<seed>.md")
    return parser.parse_args()


def parse_method_scales(specs: list[str], methods: set[str]) -> dict[str, float]:
    """`["PPAP=3", "single expert=1"]` -> {"PPAP": 3.0, "single expert": 1.0}, methods checked by name."""
    scales = {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        if not sep or name not in methods:
            raise SystemExit(f"--method-scale takes METHOD=SCALE with METHOD one of {sorted(methods)}, got {spec!r}.")
        scales[name] = float(value)
    return scales


def guidance_for_method(method: str | None, ppap_dir: Path, task: str, pipe, cache: dict):
    """`target -> guidance_fn` for one method, or None for no guidance."""
    if method is None:
        return None
    key = (method, task)
    if key not in cache:
        if method == "naive":
            guide = PPAPGuidance.from_pretrained(ppap_dir / ("classifier" if task == "classification" else "regressor"))
            cache[key] = DecodedGuide(guide.guide, pipe.vae, guide.task, guide.labels)
        else:
            cache[key] = PPAPGuidance.from_pretrained(ppap_dir / method)
    return cache[key]


def time_interleaved(pipe, fns: dict, prompts: list[str], reps: int, **call_kwargs) -> dict[str, float]:
    """Median seconds per call of each guidance_fn (None = unguided), alternating methods within each repetition."""
    times = {name: [] for name in fns}
    for rep in range(reps + 1):  # the first round warms up and is not counted
        for name, fn in fns.items():
            start = time.perf_counter()
            pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), guidance_fn=fn, output_type="pil", **call_kwargs)
            if rep > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def grid(rows: dict[str, list[Image.Image]], zoom: int = 3) -> Image.Image:
    """Images side by side per row, rows stacked (row labels go in the docs)."""
    rendered = [np.concatenate([np.asarray(im.convert("RGB")) for im in images], axis=1) for images in rows.values()]
    picture = Image.fromarray(np.concatenate(rendered, axis=0))
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)


def main() -> None:
    args = parse_args()
    location = resolve_model_location(args.model)
    pipe = FastPipeline.from_pretrained(location)
    if not isinstance(pipe, FastDiffusionPipeline):  # the teacher's folder names StableDiffusionPipeline
        pipe = FastDiffusionPipeline.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    defaults = read_fastgen_metadata(location).get("default_inference", {})
    call_kwargs = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale") if k in defaults}
    ppap_dir = Path(resolve_model_location(args.ppap))
    judge = ShapesJudge.from_pretrained()
    tasks = ["classification", "regression"] if args.task == "both" else [args.task]
    guide_kwargs = {"scale": args.scale, "grad_rms": args.grad_rms}
    method_scales = parse_method_scales(args.method_scale, {*CLASSIFIER_METHODS, *REGRESSOR_METHODS})

    lines = [f"# PPAP on ShapesWorld: {args.model}", "",
             f"`python {shlex.join(sys.argv)}`; sampler {call_kwargs}; n = {args.n} prompts per method, seed {args.seed}.",
             ""]  # fmt: skip
    record = {"model": args.model, "seed": args.seed, "n": args.n, "call": call_kwargs, **guide_kwargs,
              "method_scales": method_scales, "tasks": {}}  # fmt: skip
    figure_rows = {}
    cache: dict = {}
    for task in tasks:
        methods = CLASSIFIER_METHODS if task == "classification" else REGRESSOR_METHODS
        methods = {k: v for k, v in methods.items() if args.methods is None or k in args.methods}
        attribute = "shape" if task == "classification" else "position"
        rows = {}
        for name, method in methods.items():
            guidance = guidance_for_method(method, ppap_dir, task, pipe, cache)
            kwargs = {**guide_kwargs, "scale": method_scales.get(name, args.scale)}
            guidance_for = None if guidance is None else (lambda target, g=guidance, kw=kwargs: bind_target(g, task, target, **kw))
            result = evaluate_guided(pipe, judge, task, guidance_for, args.n, args.seed, args.batch_size, **call_kwargs)
            per_target = len(result["images"]) // len(targets_for(task))
            shown = min(2, per_target)
            figure_rows[f"{task}: {name}"] = [result["images"][k * per_target + j] for k in range(len(targets_for(task))) for j in range(shown)]
            rows[name] = {k: v for k, v in result.items() if k not in ("images", "targets")}
            print(name, rows[name], flush=True)
        record["tasks"][task] = rows
        stated = list(next(iter(rows.values()))["stated"])
        extra = ["centre error (px)"] if task == "regression" else []
        lines += [f"## {attribute} guided ({task} guide), prompts without the {attribute}", "",
                  f"| method | scale | {attribute} = target | " + " | ".join(extra + stated) + " | images/s |",
                  "|---" * (len(stated) + len(extra) + 4) + "|"]  # fmt: skip
        for name, row in rows.items():
            cells = ([f"{row['centre_error_px']:.2f}"] if extra else []) + [f"{row['stated'][s]:.3f}" for s in stated]
            scale = "-" if methods[name] is None else f"{method_scales.get(name, args.scale):g}"
            lines.append(f"| {name} | {scale} | {row['target_rate']:.3f} | " + " | ".join(cells) + f" | {row['images_per_second']:.1f} |")
        lines.append("")

    if args.timing_reps > 0:  # cost: one batch, unguided, naive and PPAP, interleaved
        batch_size = args.timing_batch_size or args.batch_size
        prompts = [p.caption for p in evaluation_prompts(batch_size, seed=args.seed)]
        fns = {"no guidance": None}
        for name, method in CLASSIFIER_METHODS.items():
            if method in ("naive", "classifier"):
                guidance = guidance_for_method(method, ppap_dir, "classification", pipe, cache)
                kwargs = {**guide_kwargs, "scale": method_scales.get(name, args.scale)}
                fns[name] = bind_target(guidance, "classification", "triangle", **kwargs)
        seconds = time_interleaved(pipe, fns, prompts, args.timing_reps, **call_kwargs)
        record["seconds_per_batch"] = seconds
        lines += [f"## Cost (batch of {batch_size}, median of {args.timing_reps} interleaved runs after a warm-up round)", "",
                  "| method | time / unguided |", "|---|---|"]  # fmt: skip
        lines += [f"| {name} | {seconds[name] / seconds['no guidance']:.2f}x |" for name in seconds]

    out = args.out or RESULTS / f"ppap_{Path(args.model).name}_{args.task}_seed{args.seed}.md"
    write_report(out, lines, record)
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        grid(figure_rows).save(args.figure)


if __name__ == "__main__":
    main()
