#!/usr/bin/env python
"""The speed table: what a text-to-image call costs, what it is made of, and what the tiny decoder saves.

For each size (the ShapesWorld models; SD1.5's architecture with random weights at 256 and 512) and batch size,
every pipeline variant (the teacher's default sampler, 2-RF few-step, the one-step students, each with the full
VAE or the tiny decoder, and with a NASA negative prompt) is timed in one process, interleaved round-robin with
the bare forwards its call is made of (text encoder, UNet at the call's batch, decoder), so that slow spells of a
shared machine hit them alike. Per row:

- wall time per image and images/s (median over rounds),
- the forwards' sum, text + steps x UNet(batch x CFG factor) + decode, and the overhead ratio
  pipeline / sum, as the median of per-round ratios with its interquartile range (rounds continue until the
  range is narrow enough to tell 1.05x apart, or `--max-repeats`),
- the ratio of the teacher's default sampler's time to this row's (measured for ShapesWorld; for random SD1.5
  weights the teacher is text + 25 x UNet(2 x batch) + decode from the same run's forwards, since 25-step calls
  at 512 do not fit a CPU budget),
- peak memory of one call: CUDA's max allocated, or on the CPU the peak resident set above the level before the
  call (sampled every 2 ms; the allocator's cache and the sampling make it approximate).

`--options` adds a second table: CPU (or GPU) execution options on one one-step pipeline, each against eager in
one interleaved run: channels_last, fused QKV projections, bf16 autocast, torch.compile default and
max-autotune (compile time reported).

    python benchmarks/bench_speed.py --sizes shapes --batch-sizes 1 16 64 --options  # writes results/speed.md
    python benchmarks/bench_speed.py --sizes sd15-256 sd15-512 --batch-sizes 1 4 16 --max-repeats 3
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderTiny

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nasa_cost import build_pipeline, cpu_name  # noqa: E402
from make_random_sd15 import SD15_ARCHITECTURE  # noqa: E402
from report import write_report  # noqa: E402

from fastgen_diffusers import FastPipeline, assets  # noqa: E402
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location  # noqa: E402


PROMPT = "a small red triangle at the top left on a black background"
NEGATIVE_PROMPT = "a blue square"
TEACHER_STEPS, TEACHER_GUIDANCE = 25, 7.5  # SD1.5's usual default sampler, for the random-weight sizes
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One pipeline variant at one batch size: how to call it and which bare forwards its call is made of."""

    name: str
    pipe: object
    call_kwargs: dict
    steps: int
    cfg: bool
    negative: bool
    decoder: str  # "full" or "tiny"
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    peak_mib: float | None = None


# --- measurement ---------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(call: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def peak_memory_mib(call: Callable[[], object], device: str) -> float:
    """Peak memory one call adds: CUDA's max allocated, or on the CPU the sampled peak resident set above its
    level before the call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], resident_bytes()) - base) / 2**20


def interquartile(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


# --- the bare forwards --------------------------------------------------------------------------------


class Forwards:
    """The bare module calls a pipeline call is made of, on inputs shaped as the pipeline's own."""

    def __init__(self, pipe, batch: int, device: str, dtype: torch.dtype):
        self.pipe, self.batch = pipe, batch
        tokenizer = pipe.tokenizer
        self.input_ids = tokenizer(
            [PROMPT] * batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        unet = pipe.unet
        size = unet.config.sample_size
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(2 * batch, unet.config.in_channels, size, size, generator=generator).to(
            device, dtype
        )
        with torch.no_grad():
            embeds = pipe.text_encoder(self.input_ids)[0]
        self.embeds = torch.cat([embeds, embeds]).to(dtype)

    @torch.no_grad()
    def text(self) -> None:
        self.pipe.text_encoder(self.input_ids)

    @torch.no_grad()
    def unet(self, factor: int) -> None:
        n = self.batch * factor
        self.pipe.unet(self.latents[:n], 999, encoder_hidden_states=self.embeds[:n])

    @torch.no_grad()
    def decode(self, vae) -> None:
        vae.decode(self.latents[: self.batch] / vae.config.scaling_factor)


# --- what is measured ---------------------------------------------------------------------------------


def load_shapes(name: str, device: str, dtype: torch.dtype):
    pipe = FastPipeline.from_pretrained(name, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    defaults = read_fastgen_metadata(str(assets.path(name))).get("default_inference", {})
    return pipe, defaults.get("num_inference_steps", 1), defaults.get("guidance_scale", 1.0)


def load_tiny_decoder(size: str, name_or_path: str, device: str, dtype: torch.dtype) -> AutoencoderTiny:
    """The ShapesWorld tiny decoder (`--tiny-decoder`, the shipped one by default), or a randomly initialised TAESD-architecture one (1.2M parameters) for
    SD1.5's latent space (speed does not depend on the weights)."""
    if size == "shapes":
        tiny = AutoencoderTiny.from_pretrained(resolve_model_location(name_or_path), torch_dtype=dtype)
    else:
        torch.manual_seed(0)
        tiny = AutoencoderTiny().to(dtype=dtype)
    return tiny.to(device).eval()


SHAPES_MODELS = ("shapes-teacher", "shapes-2rf", "shapes-instaflow", "shapes-snoopi")


def shapes_rows(
    batch: int, device: str, dtype: torch.dtype, tiny: AutoencoderTiny, models: list[str] = SHAPES_MODELS
) -> tuple[list[Row], dict]:
    prompts = [PROMPT] * batch
    rows, pipes = [], {}
    for name in models:
        pipe, steps, guidance = load_shapes(name, device, dtype)
        pipes[name] = pipe
        kwargs = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": guidance}
        cfg = guidance > 1
        label = f"{name} ({steps} step{'s' if steps > 1 else ''}{', CFG' if cfg else ''})"
        rows.append(Row(label, pipe, kwargs, steps, cfg, False, "full"))
        if name == "shapes-teacher":
            continue
        tiny_pipe = FastPipeline.from_pretrained(name, torch_dtype=dtype, vae=tiny).to(device)
        tiny_pipe.set_progress_bar_config(disable=True)
        rows.append(Row(f"{label} + tiny decoder", tiny_pipe, kwargs, steps, cfg, False, "tiny"))
        if steps == 1:
            negative = {**kwargs, "negative_prompt": [NEGATIVE_PROMPT] * batch}
            rows.append(Row(f"{label} + NASA", pipe, negative, steps, cfg, True, "full"))
            rows.append(Row(f"{label} + NASA + tiny decoder", tiny_pipe, negative, steps, cfg, True, "tiny"))
    return rows, pipes


def sd15_pipeline(resolution: int, device: str, dtype: torch.dtype):
    architecture = argparse.Namespace(
        **{**SD15_ARCHITECTURE, "resolution": resolution}, device=device, dtype="float32"
    )
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = build_pipeline(architecture, Path(tokenizer_dir))
    return pipe.to(dtype=dtype)


def sd15_rows(pipe, batch: int, tiny: AutoencoderTiny) -> list[Row]:
    kwargs = {"prompt": [PROMPT] * batch, "num_inference_steps": 1, "guidance_scale": 1.0}
    negative = {**kwargs, "negative_prompt": [NEGATIVE_PROMPT] * batch}
    full_vae = pipe.vae
    tiny_pipe = type(pipe)(**{**pipe.components, "vae": tiny})
    tiny_pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is full_vae
    return [
        Row("one-step (random SD1.5 weights)", pipe, kwargs, 1, False, False, "full"),
        Row("one-step + tiny decoder", tiny_pipe, kwargs, 1, False, False, "tiny"),
        Row("one-step + NASA", pipe, negative, 1, False, True, "full"),
        Row("one-step + NASA + tiny decoder", tiny_pipe, negative, 1, False, True, "tiny"),
    ]


def measure_group(rows: list[Row], forwards: Forwards, vaes: dict, args, device: str) -> dict[str, list[float]]:
    """Round-robin over every row's call and every distinct forward until each row's overhead ratio is tight."""
    units = {"text": forwards.text, "unet x1": lambda: forwards.unet(1), "unet x2": lambda: forwards.unet(2)}
    units.update({f"decode {name}": (lambda v=vae: forwards.decode(v)) for name, vae in vaes.items()})
    for _ in range(args.warmup):
        for call in units.values():
            call()
        for row in rows:
            row.pipe(**row.call_kwargs, output_type="pil")
    unit_times: dict[str, list[float]] = {name: [] for name in units}
    for round_index in range(args.max_repeats):
        this_round = {name: timed(call, device) for name, call in units.items()}
        for name, seconds in this_round.items():
            unit_times[name].append(seconds)
        for row in rows:
            row.times.append(timed(lambda: row.pipe(**row.call_kwargs, output_type="pil"), device))
            row.ratios.append(row.times[-1] / forward_sum(row, this_round))
        if round_index + 1 >= args.min_repeats and all(spread(r.ratios) <= args.target_spread for r in rows):
            break
    for row in rows:
        row.peak_mib = peak_memory_mib(lambda: row.pipe(**row.call_kwargs, output_type="pil"), device)
    return unit_times


def forward_sum(row: Row, unit: dict[str, float]) -> float:
    """text encoder (again for a negative prompt) + steps x UNet (doubled batch under CFG) + decode."""
    text_calls = 2 if (row.cfg or row.negative) else 1
    return (
        text_calls * unit["text"]
        + row.steps * unit["unet x2" if row.cfg else "unet x1"]
        + unit[f"decode {row.decoder}"]
    )


def spread(values: list[float]) -> float:
    low, high = interquartile(values)
    return high - low


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- options ------------------------------------------------------------------------------------------


def apply_option(pipe, option: str) -> float:
    """Apply one execution option to a pipeline in place; returns the seconds it took (compilation is lazy, so
    the first call's extra time is reported separately)."""
    start = time.perf_counter()
    if option == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    elif option == "fused QKV":
        pipe.unet.fuse_qkv_projections()
    elif option.startswith("torch.compile"):
        mode = option.split()[1] if len(option.split()) > 1 else None  # max-autotune, reduce-overhead (CUDA graphs)
        pipe.unet.compile(mode=mode)
        pipe.vae.decoder.compile(mode=mode)
    elif option not in ("eager", "bf16 autocast"):
        raise ValueError(f"unknown option {option!r}")
    return time.perf_counter() - start


def options_pipeline(args, device: str, dtype: torch.dtype):
    """A fresh pipeline for one option: an embedded ShapesWorld model, or `sd15-256` / `sd15-512` random weights."""
    size = "shapes" if not args.options_model.startswith("sd15-") else args.options_model
    tiny = load_tiny_decoder(size, args.tiny_decoder, device, dtype) if args.options_tiny else None
    if size == "shapes":
        pipe = FastPipeline.from_pretrained(args.options_model, torch_dtype=dtype, **({"vae": tiny} if tiny else {}))
    else:
        pipe = sd15_pipeline(int(size.split("-")[1]), device, dtype)
        if tiny is not None:
            pipe = type(pipe)(**{**pipe.components, "vae": tiny})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def count_flops(args, device: str) -> dict:
    """FLOPs of one options-model call, counted by torch's FlopCounterMode from the ops the model runs (matmuls,
    convolutions, attention), per module group, and the call's achieved rate."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = options_pipeline(args, device, getattr(torch, args.dtype))
    kwargs = {"prompt": [PROMPT] * args.options_batch[0], "num_inference_steps": 1, "guidance_scale": 1.0}
    pipe(**kwargs, output_type="pil")
    counter = FlopCounterMode(display=False, depth=1)
    with counter:
        pipe(**kwargs, output_type="pil")
    per_module = {  # top-level modules only: torch lists every submodule whatever the depth asked
        name: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name != "Global" and "." not in name
    }
    seconds = median([timed(lambda: pipe(**kwargs, output_type="pil"), device) for _ in range(args.options_repeats)])
    total = counter.get_total_flops()
    return {
        "total_flops": total,
        "per_module": per_module,
        "eager_seconds": seconds,
        "tflops_per_s": total / seconds / 1e12,
    }


def pixels(images) -> torch.Tensor:
    """uint8 PIL images as one int16 tensor, for differences in grey levels."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).to(torch.int16)


def measure_options(args, device: str, batch: int) -> list[dict]:
    """Each option on a fresh pipeline, timed round-robin against eager (the order rotating each round, so no option
    always follows the same one); its first call (setup and compilation) reported apart; its images compared with
    eager's on the same seed."""
    kwargs = {"prompt": [PROMPT] * batch, "num_inference_steps": 1, "guidance_scale": 1.0}
    entries = []
    dtype = getattr(torch, args.dtype)
    for option in args.option_list:
        pipe = options_pipeline(args, device, dtype)
        autocast = (
            torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if option == "bf16 autocast" else nullcontext()
        )
        setup = apply_option(pipe, option)

        def call(pipe=pipe, autocast=autocast):
            with autocast:
                return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pil").images

        start = time.perf_counter()
        try:
            images = call()
        except Exception as error:  # an option this machine cannot run is reported, not fatal
            entries.append({"option": option, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        first = time.perf_counter() - start + setup
        entries.append({"option": option, "call": call, "first_call_s": first, "times": [], "pixels": pixels(images)})
        print(f"options batch {batch}: {option} first call {first:.1f} s", flush=True)
    runnable = [e for e in entries if "call" in e]
    for _ in range(args.warmup):
        for entry in runnable:
            entry["call"]()
    for round_index in range(args.options_repeats):
        shift = round_index % len(runnable)
        for entry in runnable[shift:] + runnable[:shift]:
            entry["times"].append(timed(entry["call"], device))
    eager = next((e for e in runnable if e["option"] == "eager"), None)
    eager_pixels = eager["pixels"] if eager else None
    for entry in runnable:
        per_round = [t / e for t, e in zip(entry["times"], eager["times"])] if eager else [float("nan")]
        entry["ratio"], entry["ratio_iqr"] = median(per_round), interquartile(per_round)
        entry["ms"] = 1000 * median(entry["times"])
        difference = (entry["pixels"] - eager_pixels).abs() if eager else torch.zeros(1)
        entry["max_abs_pixel_diff"], entry["mean_abs_pixel_diff"] = (
            int(difference.max()),
            float(difference.float().mean()),
        )
        entry["within_tolerance"] = entry["max_abs_pixel_diff"] <= args.options_tolerance
        entry["helps"] = entry["ratio_iqr"][1] < 0.97 and entry["within_tolerance"]
        del entry["call"], entry["pixels"]
    return entries


# --- how fast a decoder could make a call (Amdahl) --------------------------------------------------------


def decode_bound(args, device: str) -> tuple[list[str], list[dict]]:
    """The best a faster decoder can do: a call that stops at the latents (`output_type="latent"`) plus the image
    post-processing every call keeps, over the same call with the full VAE, interleaved with the tiny decoder's
    call and the bare decoder forwards, per batch size."""
    tiny = load_tiny_decoder("shapes", args.tiny_decoder, device, torch.float32)
    results = []
    for name in args.bound_models:
        full_pipe, steps, guidance = load_shapes(name, device, torch.float32)
        tiny_pipe = FastPipeline.from_pretrained(name, vae=tiny).to(device)
        tiny_pipe.set_progress_bar_config(disable=True)
        settings = {"num_inference_steps": steps, "guidance_scale": guidance}
        for batch in args.bound_batches:
            prompt = [PROMPT] * batch
            forwards = Forwards(full_pipe, batch, device, torch.float32)
            blank = torch.zeros(
                batch,
                3,
                full_pipe.unet.config.sample_size * full_pipe.vae_scale_factor,
                full_pipe.unet.config.sample_size * full_pipe.vae_scale_factor,
            )
            units = {
                "full VAE call": lambda: full_pipe(prompt=prompt, **settings, output_type="pil"),
                "tiny decoder call": lambda: tiny_pipe(prompt=prompt, **settings, output_type="pil"),
                "call to latents": lambda: full_pipe(prompt=prompt, **settings, output_type="latent"),
                "post-processing": lambda: full_pipe.image_processor.postprocess(blank, output_type="pil"),
                "full decoder forward": lambda: forwards.decode(full_pipe.vae),
                "tiny decoder forward": lambda: forwards.decode(tiny),
            }
            for _ in range(args.warmup):
                for call in units.values():
                    call()
            times = {unit: [] for unit in units}
            order = list(units)
            for round_index in range(args.bound_repeats):
                shift = round_index % len(order)
                for unit in order[shift:] + order[:shift]:
                    times[unit].append(timed(units[unit], device))
            full = times["full VAE call"]
            free = [(lat + post) / f for lat, post, f in zip(times["call to latents"], times["post-processing"], full)]
            with_tiny = [t / f for t, f in zip(times["tiny decoder call"], full)]
            results.append({
                "model": name, "batch": batch, "ms": {unit: 1000 * median(values) for unit, values in times.items()},
                "free_decoder_ratio": median(free), "free_decoder_iqr": interquartile(free),
                "tiny_ratio": median(with_tiny), "tiny_iqr": interquartile(with_tiny), "rounds": args.bound_repeats,
            })  # fmt: skip
            print(
                f"decode bound {name} batch {batch}: free decoder {median(free):.3f}, tiny {median(with_tiny):.3f}",
                flush=True,
            )
    lines = [
        "## How fast can a faster decoder make the call? (Amdahl bound)",
        "",
        "Per model and batch, interleaved rounds (order rotating) of: the one-step call with the full VAE, the same"
        ' call with the tiny decoder, the call stopped at the latents (`output_type="latent"`: text encoder, UNet,'
        " the pipeline's own work), the image post-processing every call keeps (tensor to PIL), and the bare decoder"
        " forwards. A decoder that took no time at all would leave the call at (latents + post-processing) / full:"
        " the bound no decoder can beat. Medians in ms; ratios as medians of per-round ratios (IQR).",
        "",
        "| model | batch | full VAE call | call to latents | post-processing | full decoder forward | tiny decoder forward"
        " | tiny decoder call | bound: free decoder / full (IQR) | tiny / full (IQR) | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = r["ms"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {ms['full VAE call']:.1f} | {ms['call to latents']:.1f} |"
            f" {ms['post-processing']:.1f} | {ms['full decoder forward']:.1f} | {ms['tiny decoder forward']:.1f} |"
            f" {ms['tiny decoder call']:.1f} | {r['free_decoder_ratio']:.3f} ({r['free_decoder_iqr'][0]:.3f}-"
            f"{r['free_decoder_iqr'][1]:.3f}) | {r['tiny_ratio']:.3f} ({r['tiny_iqr'][0]:.3f}-{r['tiny_iqr'][1]:.3f}) |"
            f" {r['rounds']} |"
        )
    return lines, results


# --- the tiny decoder's goals ------------------------------------------------------------------------


def decoder_goals(args, device: str) -> tuple[list[str], list[dict]]:
    """For each one-step ShapesWorld model, in one run: the call's time with each tiny decoder over the full VAE
    (interleaved, order rotating), the project's evaluation of each decoder's images on the same prompts and seeds
    (adherence with the judge's reject, as `fastgen eval`; without it; the reject rate; fidelity, the mean distance
    to the nearest clean drawing), and each tiny decoder's pixel error against the full decoder's images."""
    from fastgen_diffusers.shapes import evaluation_prompts
    from fastgen_diffusers.shapes.evaluate import generate_images, judged, reject_and_fidelity
    from fastgen_diffusers.shapes.judge import ShapesJudge, to_uint8_array
    from fastgen_diffusers.shapes.metrics import attribute_adherence

    judge = ShapesJudge.from_pretrained()
    prompts = evaluation_prompts(args.decoder_goals, seed=0)
    prompted = [p.attributes for p in prompts]
    decoders = {name: load_tiny_decoder("shapes", name, device, torch.float32) for name in args.goals_decoders}
    results = []
    for model in args.decoder_goals_models:
        full_pipe, steps, guidance = load_shapes(model, device, torch.float32)
        pipes = {"full VAE": full_pipe}
        for name, tiny in decoders.items():
            pipes[name] = FastPipeline.from_pretrained(model, vae=tiny).to(device)
            pipes[name].set_progress_bar_config(disable=True)
        settings = {"num_inference_steps": steps, "guidance_scale": guidance}
        calls = {
            decoder: (lambda p=pipe: p(prompt=[PROMPT] * args.goals_batch, **settings, output_type="pil"))
            for decoder, pipe in pipes.items()
        }
        for call in calls.values():
            call()
        times = {decoder: [] for decoder in calls}
        order = list(calls)
        for round_index in range(args.goals_repeats):
            shift = round_index % len(order)
            for decoder in order[shift:] + order[:shift]:
                times[decoder].append(timed(calls[decoder], device))
        full_pixels = None
        for decoder, pipe in pipes.items():
            images = generate_images(pipe, [p.caption for p in prompts], seed=0, batch_size=64, **settings)
            predicted, fits = judged(judge, images)
            pixels = to_uint8_array(images).astype(float)
            full_pixels = pixels if full_pixels is None else full_pixels
            per_round = [t / f for t, f in zip(times[decoder], times["full VAE"])]
            results.append({
                "model": model, "decoder": decoder, "time_ratio": median(per_round),
                "time_ratio_iqr": interquartile(per_round), "ms": 1000 * median(times[decoder]),
                "adherence": attribute_adherence(predicted, prompted),
                "adherence_unrejected": attribute_adherence(judge.read(images, reject=False), prompted),
                **reject_and_fidelity(predicted, fits),
                "pixel_mae": float(abs(pixels - full_pixels).mean()),
                "pixel_rmse": float(((pixels - full_pixels) ** 2).mean() ** 0.5),
            })  # fmt: skip
            print(f"goals {model} {decoder}: adherence {results[-1]['adherence']['all']:.3f}", flush=True)
    columns = ["shape", "colour", "size", "position", "background"]
    lines = [
        "## The tiny decoder's goals",
        "",
        f"One run: each model's one-step call at batch {args.goals_batch} with each decoder, over the same call with"
        f" the full VAE (median of {args.goals_repeats} interleaved rounds, IQR); the evaluation of each decoder's"
        f" images on the first {args.decoder_goals} evaluation prompts (seed 0, the same seeds for every decoder,"
        " so only the decoder differs): adherence with the judge's reject (as `fastgen eval`; points against the"
        " full VAE), per attribute, without the reject, the reject rate, fidelity (mean distance to the nearest clean"
        " drawing, lower is better; x the full VAE's) and the pixel error against the full decoder's images (0-255)."
        " Goals: adherence within 1 point, fidelity or pixel error within 1.1x, call time <= 0.5x.",
        "",
        "| model | decoder | call / full VAE (IQR) | ms | adherence all (points) | "
        + " | ".join(columns)
        + " | all, no reject | rejected | fidelity (x full) | pixel MAE | pixel RMSE |",
        "|---|---|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|",
    ]
    for r in results:
        full = next(f for f in results if f["model"] == r["model"] and f["decoder"] == "full VAE")
        low, high = r["time_ratio_iqr"]
        delta = 100 * (r["adherence"]["all"] - full["adherence"]["all"])
        lines.append(
            f"| {r['model']} | {r['decoder']} | {r['time_ratio']:.3f} ({low:.3f}-{high:.3f}) | {r['ms']:.0f} |"
            f" {100 * r['adherence']['all']:.1f} ({delta:+.1f}) | "
            + " | ".join(f"{100 * r['adherence'][c]:.1f}" for c in columns)
            + f" | {100 * r['adherence_unrejected']['all']:.1f} | {100 * r['rejected']:.1f}% |"
            f" {r['fidelity']:.3f} ({r['fidelity'] / full['fidelity']:.2f}x) | {r['pixel_mae']:.2f} |"
            f" {r['pixel_rmse']:.2f} |"
        )
    return lines, results


# --- the report ---------------------------------------------------------------------------------------


def row_record(row: Row, teacher_seconds: float, batch: int, unit_times: dict) -> dict:
    seconds = median(row.times)
    forwards = {name: median(times) for name, times in unit_times.items()}
    low, high = interquartile(row.ratios)
    return {
        "pipeline": row.name,
        "batch": batch,
        "ms_per_image": 1000 * seconds / batch,
        "images_per_s": batch / seconds,
        "text_ms": 1000 * forwards["text"] * (2 if (row.cfg or row.negative) else 1),
        "unet_ms": 1000 * row.steps * forwards["unet x2" if row.cfg else "unet x1"],
        "unet_calls": f"{row.steps} x {'2' if row.cfg else '1'}",
        "decode_ms": 1000 * forwards[f"decode {row.decoder}"],
        "overhead": median(row.ratios),
        "overhead_iqr": (low, high),
        "vs_teacher": teacher_seconds / seconds,
        "peak_mib": row.peak_mib,
        "rounds": len(row.times),
    }


def table_lines(records: list[dict]) -> list[str]:
    lines = [
        "| size | pipeline | batch | ms/image | images/s | text ms | UNet ms (steps x CFG) | decode ms | overhead"
        " (IQR) | x teacher | peak MiB | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        low, high = r["overhead_iqr"]
        lines.append(
            f"| {r['size']} | {r['pipeline']} | {r['batch']} | {r['ms_per_image']:.1f} | {r['images_per_s']:.1f} |"
            f" {r['text_ms']:.1f} | {r['unet_ms']:.1f} ({r['unet_calls']}) | {r['decode_ms']:.1f} |"
            f" {r['overhead']:.3f} ({low:.3f}-{high:.3f}) | {r['vs_teacher']:.1f}{r['teacher_note']} |"
            f" {r['peak_mib']:.0f} | {r['rounds']} |"
        )
    return lines


def options_lines(entries: list[dict], args, batch: int) -> list[str]:
    lines = [
        f"## Execution options: `{args.options_model}` one-step, batch {batch}"
        f"{', tiny decoder' if args.options_tiny else ', full VAE'}",
        "",
        f"Median of {args.options_repeats} interleaved rounds after {args.warmup} warm-up call(s), each option over"
        " eager in the same round; kept where the upper quartile of that ratio is below 0.97 and the images (same"
        f" seed) differ from eager's by at most {args.options_tolerance} grey levels (0-255) anywhere. The first call"
        " (setup, and compilation for torch.compile) is reported apart.",
        "",
        "| option | time / eager (IQR) | ms per call | first call incl. setup/compile (s) | pixel diff vs eager:"
        " max / mean | kept |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['option']} | failed: {e['error']} | | | | no |")
            continue
        low, high = e["ratio_iqr"]
        kept = "baseline" if e["option"] == "eager" else ("yes" if e["helps"] else "no")
        lines.append(
            f"| {e['option']} | {e['ratio']:.3f} ({low:.3f}-{high:.3f}) | {e['ms']:.1f} | {e['first_call_s']:.1f} |"
            f" {e['max_abs_pixel_diff']} / {e['mean_abs_pixel_diff']:.3f} | {kept} |"
        )
    return lines


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["size"], r["batch"]) for r in records}, key=lambda g: (g[0], g[1]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.5), squeeze=False)
    for ax, (size, batch) in zip(axes[0], groups):
        rows = [r for r in records if (r["size"], r["batch"]) == (size, batch)]
        names = [r["pipeline"].replace("shapes-", "").replace(" (random SD1.5 weights)", "") for r in rows]
        parts = {
            "text encoder": [r["text_ms"] for r in rows],
            "UNet": [r["unet_ms"] for r in rows],
            "decode": [r["decode_ms"] for r in rows],
        }
        overhead = [
            max(0.0, r["ms_per_image"] * r["batch"] - sum(p[i] for p in parts.values())) for i, r in enumerate(rows)
        ]
        left = [0.0] * len(rows)
        for (label, values), colour in zip([*parts.items(), ("rest of the call", overhead)],
                                           ["#8da0cb", "#66c2a5", "#fc8d62", "#cccccc"]):  # fmt: skip
            per_image = [v / batch for v in values]
            ax.barh(names, per_image, left=left, color=colour, label=label)
            left = [a + b for a, b in zip(left, per_image)]
        ax.invert_yaxis()
        if max(left) > 50 * min(left):  # a 25-step teacher beside one-step calls
            ax.set_xscale("log")
        ax.set_title(f"{size}, batch {batch}")
        ax.set_xlabel("ms per image")
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, dpi=110, format="png")
    partial.replace(path)


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else ["?"] * 3
    return f"{cpu_name()}, {torch.get_num_threads()} threads, load average {' / '.join(load)} (1/5/15 min) at the end"


def header_lines(args, device: str) -> list[str]:
    return [
        "# Speed: where the time of a call goes",
        "",
        f"One run of `python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}` on {device_description(device)}"
        f" ({args.dtype}; torch {torch.__version__}, diffusers {diffusers.__version__}). Times are medians of"
        " interleaved rounds; the overhead ratio is the pipeline call over the sum of its bare forwards measured"
        " in the same round (median and interquartile range over rounds). `x teacher`: how many times faster than"
        " the teacher's default sampler at the same batch (ShapesWorld: `shapes-teacher`'s 25 DDIM steps at CFG"
        f" 4, measured; * SD1.5 size: {TEACHER_STEPS} steps at CFG, text + {TEACHER_STEPS} x UNet(2 x batch) +"
        " decode from this run's forwards). Peak MiB: memory one call adds (CPU: sampled resident set). Bare"
        " forwards of ShapesWorld rows run on `shapes-instaflow`'s modules (every ShapesWorld model has the"
        " teacher's architecture).",
        "",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["shapes"], choices=["shapes", "sd15-256", "sd15-512"])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16], help="None: skip the main table.")
    parser.add_argument(
        "--shapes-models",
        nargs="+",
        default=list(SHAPES_MODELS),
        choices=SHAPES_MODELS,
        help="The ShapesWorld models to time (e.g. only the one-step students at batch 64, where the teacher's"
        " 25-step sampler would take minutes a round); the ratio to the teacher needs shapes-teacher.",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=15)
    parser.add_argument(
        "--target-spread", type=float, default=0.04, help="Stop once every overhead ratio's IQR is this narrow."
    )
    parser.add_argument("--tiny-decoder", default="shapes-tiny-decoder", help="The ShapesWorld AutoencoderTiny.")
    parser.add_argument("--options", action="store_true", help="Also measure execution options (second table).")
    parser.add_argument(
        "--option-list",
        nargs="+",
        default=[
            "eager",
            "channels_last",
            "fused QKV",
            "bf16 autocast",
            "torch.compile",
            "torch.compile max-autotune",
        ],
        help="Also `torch.compile reduce-overhead` (CUDA graphs, on a GPU).",
    )
    parser.add_argument(
        "--flops", action="store_true", help="Count one options-model call's FLOPs and the rate eager reaches."
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="The device's datasheet dense peak, TFLOP/s.")
    parser.add_argument("--options-model", default="shapes-instaflow", help="An embedded model, sd15-256 or sd15-512.")
    parser.add_argument("--options-batch", type=int, nargs="+", default=[16])
    parser.add_argument(
        "--options-tolerance",
        type=int,
        default=2,
        help="Largest pixel difference from eager's images (0-255) an option may make and still be kept.",
    )
    parser.add_argument("--options-tiny", action="store_true", help="Options on the pipeline with the tiny decoder.")
    parser.add_argument("--options-repeats", type=int, default=7)
    parser.add_argument(
        "--decoder-goals", type=int, default=0, help="Also measure the tiny decoder's goals on this many prompts."
    )
    parser.add_argument(
        "--decode-bound", action="store_true", help="Also measure the bound a free decoder sets (Amdahl), per batch."
    )
    parser.add_argument("--bound-models", nargs="+", default=["shapes-instaflow"])
    parser.add_argument("--bound-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--bound-repeats", type=int, default=11)
    parser.add_argument(
        "--goals-decoders",
        nargs="+",
        default=None,
        help="Tiny decoders (names or folders) compared in the goals run (default: --tiny-decoder).",
    )
    parser.add_argument("--decoder-goals-models", nargs="+", default=["shapes-instaflow", "shapes-snoopi"])
    parser.add_argument("--goals-batch", type=int, default=64)
    parser.add_argument("--goals-repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.md")
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images" / "speed.png"
    )
    args = parser.parse_args()
    args.goals_decoders = args.goals_decoders or [args.tiny_decoder]
    if args.min_repeats < 1 or args.max_repeats < args.min_repeats:
        parser.error("need 1 <= --min-repeats <= --max-repeats.")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    records = []
    for size in args.sizes if args.batch_sizes else []:
        tiny = load_tiny_decoder(size, args.tiny_decoder, device, dtype)
        sd15 = sd15_pipeline(int(size.split("-")[1]), device, dtype) if size != "shapes" else None
        for batch in args.batch_sizes:
            if sd15 is None:
                rows, pipes = shapes_rows(batch, device, dtype, tiny, args.shapes_models)
                reference = pipes.get("shapes-instaflow") or next(iter(pipes.values()))
            else:
                rows, reference = sd15_rows(sd15, batch, tiny), sd15
            forwards = Forwards(reference, batch, device, dtype)
            unit_times = measure_group(rows, forwards, {"full": reference.vae, "tiny": tiny}, args, device)
            if sd15 is None:
                # Without the teacher in the run there is no ratio to it.
                teacher_seconds = median(rows[0].times) if "shapes-teacher" in args.shapes_models else float("nan")
                note = ""
            else:
                f = {name: median(times) for name, times in unit_times.items()}
                teacher_seconds = 2 * f["text"] + TEACHER_STEPS * f["unet x2"] + f["decode full"]
                note = "*"
            for row in rows:
                records.append(
                    {"size": size, **row_record(row, teacher_seconds, batch, unit_times), "teacher_note": note}
                )
            print(f"{size} batch {batch}: done", flush=True)
            write_report(args.out, header_lines(args, device) + table_lines(records), {"rows": records})  # so far
    lines = header_lines(args, device) + (table_lines(records) if records else [])
    record = {"argv": sys.argv[1:], "device": device_description(device), "rows": records}
    if args.decode_bound:
        bound_lines, record["decode_bound"] = decode_bound(args, device)
        lines += ["", *bound_lines]
        write_report(args.out, lines, record)  # so far
    if args.decoder_goals:
        goal_lines, record["decoder_goals"] = decoder_goals(args, device)
        lines += ["", *goal_lines]
    if args.options:
        record["options"] = {}
        for batch in args.options_batch:
            entries = measure_options(args, device, batch)
            lines += ["", *options_lines(entries, args, batch)]
            record["options"][str(batch)] = entries
            write_report(args.out, lines, record)  # so far
    if args.flops:
        flops = count_flops(args, device)
        record["flops"] = flops
        fraction = (
            f", {100 * flops['tflops_per_s'] / args.peak_tflops:.1f}% of the {args.peak_tflops:g} TFLOP/s peak"
            if args.peak_tflops
            else ""
        )
        lines += [
            "",
            f"## FLOPs: `{args.options_model}` one-step call, batch {args.options_batch[0]}",
            "",
            f"{flops['total_flops'] / 1e9:.1f} GFLOP counted (torch FlopCounterMode) in eager {args.dtype}:"
            f" {', '.join(f'{name} {n / 1e9:.1f}' for name, n in flops['per_module'].items())} GFLOP. Eager call"
            f" {1000 * flops['eager_seconds']:.1f} ms: {flops['tflops_per_s']:.2f} TFLOP/s{fraction}.",
        ]
    write_report(args.out, lines, record)
    if records:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
