"""Cost of a negative prompt on a one-step student: NASA (and NAG, and CFG for comparison) over the plain call.

NASA adds one key/value projection and one attention per cross-attention layer, and no UNet pass (SNOOPI
reports +1.89% FLOPs, against about 2x for CFG). This script measures that as ratios in one run, on a randomly
initialised `OneStepPipeline` built here (weights do not change the cost), interleaving the variants so that
machine noise hits them alike. It times whole pipeline calls (text encoding of the negative prompt included) and
bare UNet forwards (the attention cost alone), and writes a markdown table.

    python benchmarks/bench_nasa_cost.py  # defaults: a moderately sized UNet; writes benchmarks/results/nasa_cost.md
    python benchmarks/bench_nasa_cost.py --unet-channels 32 64 --vae-channels 32 32 --repeats 2 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fastgen_diffusers.attention import negative_attention
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.shapes.tokenizer import write_tokenizer_files


PROMPT = "a small red triangle at the top left on a black background"
NEGATIVE_PROMPT = "a blue square on a white background"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # ----------Model sizes----------
    parser.add_argument(
        "--unet-channels",
        type=int,
        nargs="+",
        default=[128, 256, 512],
        help="UNet block_out_channels; every level but the last has cross-attention, as in SD.",
    )
    parser.add_argument("--layers-per-block", type=int, default=2, help="UNet layers per block.")
    parser.add_argument("--attention-head-dim", type=int, default=8, help="Number of attention heads, as SD names it.")
    parser.add_argument("--cross-attention-dim", type=int, default=512, help="Text embedding width.")
    parser.add_argument("--text-layers", type=int, default=6, help="CLIP text encoder layers.")
    parser.add_argument("--text-length", type=int, default=77, help="Tokens per prompt (SD: 77).")
    parser.add_argument(
        "--vae-channels", type=int, nargs="+", default=[64, 128, 256, 256], help="VAE block_out_channels."
    )
    parser.add_argument("--resolution", type=int, default=256, help="Image side in pixels.")
    parser.add_argument("--batch-size", type=int, default=1, help="Images per call (num_images_per_prompt).")
    # ----------Measurement----------
    parser.add_argument("--nasa-scale", type=float, default=0.1, help="NASA alpha (cost does not depend on it).")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per variant, interleaved.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls per variant first.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="Weights dtype."
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "nasa_cost.md", help="Markdown table path."
    )
    return parser.parse_args()


def build_pipeline(args: argparse.Namespace, tokenizer_dir: Path) -> OneStepPipeline:
    """A randomly initialised SD-architecture one-step pipeline of the requested size."""
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tokenizer_files(tokenizer_dir)), model_max_length=args.text_length
    )
    levels = len(args.unet_channels)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=args.resolution // 2 ** (len(args.vae_channels) - 1),
        block_out_channels=tuple(args.unet_channels),
        layers_per_block=args.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        attention_head_dim=args.attention_head_dim,
        cross_attention_dim=args.cross_attention_dim,
    )
    vae = AutoencoderKL(
        block_out_channels=tuple(args.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(args.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(args.vae_channels),
        latent_channels=4,
        sample_size=args.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=args.cross_attention_dim,
            intermediate_size=4 * args.cross_attention_dim,
            num_attention_heads=8,
            num_hidden_layers=args.text_layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=args.text_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    pipe = OneStepPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    if args.dtype != "float32":
        pipe.to(getattr(torch, args.dtype))
    return pipe


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str) -> dict:
    """Seconds per call for each variant, round-robin so that slow spells of the machine hit all of them."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize()
            start = time.perf_counter()
            call()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def markdown_report(args: argparse.Namespace, pipe: OneStepPipeline, sections: dict[str, dict]) -> str:
    unet = pipe.unet
    cross_layers = sum(1 for name in unet.attn_processors if ".attn2." in name)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    lines = [
        "# Cost of NASA over the plain one-step call",
        "",
        (
            f"Measured in one run on {device} ({args.device}, {torch.get_num_threads()} torch threads,"
            f" {args.dtype}), torch {torch.__version__}, diffusers {diffusers.__version__}: median of"
            f" {args.repeats} interleaved calls per variant after {args.warmup} warm-up calls each, random weights."
        ),
        "",
        (
            f"UNet block_out_channels {tuple(args.unet_channels)}, {args.layers_per_block} layers per block,"
            f" {unet.num_parameters() / 1e6:.1f}M parameters, {cross_layers} cross-attention layers;"
            f" VAE {tuple(args.vae_channels)}; text encoder {args.text_layers} layers x {args.cross_attention_dim},"
            f" {args.text_length} tokens; {args.resolution}x{args.resolution} images, batch {args.batch_size};"
            f" NASA alpha {args.nasa_scale}, NAG with its default tau and alpha, CFG with guidance_scale 2."
        ),
        "",
        "| call | variant | median ms | min ms | ratio to plain (median) |",
        "|---|---|---:|---:|---:|",
    ]
    for section, times in sections.items():
        plain = statistics.median(times["plain"])
        for variant, seconds in times.items():
            median = statistics.median(seconds)
            lines.append(
                f"| {section} | {variant} | {1e3 * median:.1f} | {1e3 * min(seconds):.1f} | {median / plain:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = build_pipeline(args, Path(tokenizer_dir))

    def run_pipeline(**kwargs) -> Callable[[], object]:
        generator = torch.Generator(args.device).manual_seed(0)
        return lambda: pipe(
            PROMPT, num_images_per_prompt=args.batch_size, generator=generator, output_type="np", **kwargs
        )

    pipeline_calls = {
        "plain": run_pipeline(),
        "NASA": run_pipeline(negative_prompt=NEGATIVE_PROMPT, negative_attention={"scale": args.nasa_scale}),
        "NAG": run_pipeline(negative_prompt=NEGATIVE_PROMPT, negative_attention={"method": "nag"}),
        "CFG": run_pipeline(negative_prompt=NEGATIVE_PROMPT, guidance_scale=2.0),
    }

    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            PROMPT, args.device, args.batch_size, True, NEGATIVE_PROMPT
        )
    latent_side = args.resolution // pipe.vae_scale_factor
    latents = torch.randn(
        args.batch_size, pipe.unet.config.in_channels, latent_side, latent_side, device=args.device
    ).to(pipe.unet.dtype)

    @torch.no_grad()
    def unet_forward():
        return pipe.unet(latents, 999, encoder_hidden_states=prompt_embeds).sample

    def unet_forward_with(method: str) -> Callable[[], object]:
        def call():
            with negative_attention(pipe.unet, negative_embeds, args.nasa_scale, method=method):
                return unet_forward()

        return call

    unet_calls = {"plain": unet_forward, "NASA": unet_forward_with("nasa"), "NAG": unet_forward_with("nag")}

    sections = {
        "pipeline": time_interleaved(pipeline_calls, args.repeats, args.warmup, args.device),
        "UNet forward": time_interleaved(unet_calls, args.repeats, args.warmup, args.device),
    }
    report = markdown_report(args, pipe, sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
