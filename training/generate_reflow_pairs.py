#!/usr/bin/env python
"""Generate InstaFlow's reflow pairs: the exact noise a teacher starts from and the image latent its sampler reaches.

The teacher is any checkpoint `FastPipeline` loads: a Stable Diffusion pipeline (pairs for 2-Rectified Flow), an
embedded ShapesWorld model, or a trained 2-Rectified Flow folder (pairs for one-step distillation). Sample i starts
from noise drawn by a generator seeded with (seed, i), and shards of `--shard_size` consecutive samples are dealt
round-robin to the processes, so the pairs are the same whatever the number of processes; complete shards are
skipped, so an interrupted run resumes shard by shard.

    accelerate launch training/generate_reflow_pairs.py --pretrained_model_name_or_path shapes-teacher \\
        --output_dir runs/pairs-teacher --num_pairs 100000 --num_inference_steps 25 --guidance_scale 4 \\
        --scheduler ddim
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from fastgen_diffusers import FastPipeline, InstaFlowPipeline
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.shapes import build_dataset
from fastgen_diffusers.shapes.evaluate import image_generator
from fastgen_diffusers.training.reflow import complete_shards, num_shards, shard_indices, write_pair_shard


logger = get_logger(__name__, log_level="INFO")

SCHEDULERS = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PAIRS_CONFIG_FILE = "reflow_pairs.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("teacher")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="The teacher: a pipeline folder, a Hub id or an embedded model name (e.g. `shapes-teacher`).",
    )
    group.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="Teacher sampling steps (default: the teacher's fastgen.json `default_inference`).",
    )
    group.add_argument(
        "--guidance_scale", type=float, default=None, help="Teacher CFG scale (default: as --num_inference_steps)."
    )
    group.add_argument(
        "--scheduler",
        type=str,
        default=None,
        choices=sorted(SCHEDULERS),
        help="Replace a diffusion teacher's sampler (default: the teacher's own).",
    )
    group.add_argument("--resolution", type=int, default=None, help="Image size (default: the UNet's native one).")
    group.add_argument("--mixed_precision", type=str, default="no", choices=sorted(DTYPES), help="Teacher weights.")

    group = parser.add_argument_group("pairs")
    group.add_argument("--output_dir", type=str, required=True, help="Where the shards go.")
    group.add_argument("--num_pairs", type=int, required=True)
    group.add_argument("--shard_size", type=int, default=1000, help="Pairs per shard: the unit of resumption.")
    group.add_argument("--batch_size", type=int, default=32, help="Teacher batch size per process.")
    group.add_argument("--seed", type=int, default=0, help="Sample i's noise comes from a generator seeded (seed, i).")

    group = parser.add_argument_group("prompts (default: ShapesWorld training captions)")
    group.add_argument("--prompts_file", type=str, default=None, help="One prompt a line, cycled over the pairs.")
    group.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset (Hub id or folder).")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--dataset_split", type=str, default="train")
    group.add_argument("--caption_column", type=str, default="text")
    group.add_argument(
        "--partial_caption_prob",
        type=float,
        default=0.0,
        help="ShapesWorld: share of captions with attributes left out.",
    )
    args = parser.parse_args(argv)

    for name in ("num_pairs", "shard_size", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"`--{name}` must be a positive integer, got {getattr(args, name)}.")
    if args.num_inference_steps is not None and args.num_inference_steps <= 0:
        raise ValueError(f"`--num_inference_steps` must be a positive integer, got {args.num_inference_steps}.")
    if args.prompts_file is not None and args.dataset_name is not None:
        raise ValueError("Pass at most one of `--prompts_file` and `--dataset_name`.")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise ValueError(f"`--prompts_file` {args.prompts_file!r} is not a file.")
    if not 0.0 <= args.partial_caption_prob <= 1.0:
        raise ValueError(f"`--partial_caption_prob` must lie in [0, 1], got {args.partial_caption_prob}.")
    return args


def load_prompts(args: argparse.Namespace) -> tuple[list[str], str]:
    """The prompt of every pair, and a description of where they came from; shorter sources are cycled."""
    if args.prompts_file is not None:
        source = f"prompts file {args.prompts_file}"
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    elif args.dataset_name is not None:
        source = (
            f"dataset {args.dataset_name} ({args.dataset_config_name}, {args.dataset_split}, {args.caption_column})"
        )
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
        if args.caption_column not in dataset.column_names:
            raise ValueError(f"`--caption_column` {args.caption_column!r} is not one of {dataset.column_names}.")
        prompts = [str(caption) for caption in dataset[args.caption_column]]
    else:
        source = f"ShapesWorld train captions (seed {args.seed}, partial_caption_prob {args.partial_caption_prob})"
        rows = build_dataset(
            args.num_pairs, seed=args.seed, split="train", partial_caption_prob=args.partial_caption_prob
        )
        prompts = rows.with_format(None)["caption"]  # plain columns: no images drawn
    if not prompts:
        raise ValueError(f"No prompts in {source}.")
    return [prompts[i % len(prompts)] for i in range(args.num_pairs)], source


def check_pairs_config(output_dir: Path, config: dict) -> None:
    """Refuse to add shards to pairs made with other settings: the set would mix two couplings."""
    path = output_dir / PAIRS_CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    changed = {
        k: (saved.get(k), config.get(k)) for k in sorted(saved.keys() | config.keys()) if saved.get(k) != config.get(k)
    }
    if changed:
        raise ValueError(
            f"`--output_dir` {str(output_dir)!r} holds pairs made with other settings (saved, now): {changed}. "
            "Pass the same flags to resume, or a new `--output_dir`."
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Like `Accelerator`, honour `accelerate launch --cpu` / ACCELERATE_USE_CPU: without it, CPU processes
    # would not join one process group and each would write every shard.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)

    location = resolve_model_location(args.pretrained_model_name_or_path)
    pipe = FastPipeline.from_pretrained(location, dtype=DTYPES[args.mixed_precision])
    defaults = read_fastgen_metadata(location).get("default_inference", {})
    num_inference_steps = args.num_inference_steps or defaults.get("num_inference_steps")
    guidance_scale = args.guidance_scale if args.guidance_scale is not None else defaults.get("guidance_scale")
    if num_inference_steps is None or guidance_scale is None:
        raise ValueError(
            f"{args.pretrained_model_name_or_path!r} has no default sampler (fastgen.json); pass "
            "`--num_inference_steps` and `--guidance_scale`."
        )
    if args.scheduler is not None:
        if isinstance(pipe, InstaFlowPipeline):
            raise ValueError(
                "`--scheduler` replaces a diffusion teacher's sampler; a rectified-flow teacher keeps its Euler "
                "scheduler."
            )
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)

    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution % pipe.vae_scale_factor:
        raise ValueError(
            f"`--resolution` must be a multiple of the VAE factor {pipe.vae_scale_factor}, got {resolution}."
        )
    noise_shape = (
        pipe.unet.config.in_channels,
        resolution // pipe.vae_scale_factor,
        resolution // pipe.vae_scale_factor,
    )
    prompts, prompt_source = load_prompts(args)

    # Everything that decides a pair's content; a resumed run must match it.
    config = {
        "teacher": args.pretrained_model_name_or_path,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "mixed_precision": args.mixed_precision,
        "seed": args.seed,
        "num_pairs": args.num_pairs,
        "shard_size": args.shard_size,
        "prompt_source": prompt_source,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
    }
    check_pairs_config(output_dir, config)
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / PAIRS_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state.wait_for_everyone()

    done = set(complete_shards(output_dir))
    mine = range(state.process_index, num_shards(args.num_pairs, args.shard_size), state.num_processes)
    todo = [shard for shard in mine if shard not in done]
    logger.info(
        f"{len(done)} shards complete; this process writes {len(todo)} of its {len(mine)}.", main_process_only=False
    )

    dtype = DTYPES[args.mixed_precision]
    for shard in tqdm(todo, desc="shards", disable=not state.is_local_main_process):
        indices = shard_indices(shard, args.num_pairs, args.shard_size)
        # Cast before storing, so the stored noise is exactly what the teacher started from.
        noise = torch.stack([torch.randn(noise_shape, generator=image_generator(args.seed, i)) for i in indices]).to(
            dtype
        )
        latents = []
        for start in range(0, len(indices), args.batch_size):
            batch = indices[start : start + args.batch_size]
            output = pipe(
                prompt=[prompts[i] for i in batch],
                latents=noise[start : start + len(batch)].to(state.device),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                output_type="latent",
            )
            latents.append(output.images.cpu())
        write_pair_shard(output_dir, shard, indices, noise, torch.cat(latents), [prompts[i] for i in indices])

    state.wait_for_everyone()
    logger.info(f"{len(complete_shards(output_dir))} shards in {output_dir}")


if __name__ == "__main__":
    main()
