#!/usr/bin/env python
"""Generate InstaFlow's reflow pairs: the exact noise a teacher starts from and the image latent its sampler reaches.

The teacher is any checkpoint `FastPipeline` loads: a Stable Diffusion pipeline (pairs for 2-Rectified Flow), an
embedded ShapesWorld model, or a trained 2-Rectified Flow folder (pairs for one-step distillation). Sample i starts
from noise drawn by a generator seeded with (seed, i), and shards of `--shard_size` consecutive samples are dealt
round-robin to the processes, so the pairs are the same whatever the number of processes; complete shards are
skipped, so an interrupted run resumes shard by shard. Prompts are cycled over the pairs, a random
`--empty_prompt_prob` share of them emptied (the prompts' hash, recorded with the pairs, covers the draw).

    accelerate launch training/generate_reflow_pairs.py --pretrained_model_name_or_path shapes-teacher \\
        --output_dir runs/pairs-teacher --num_pairs 100000 --shapesworld_prompts 100000 \\
        --num_inference_steps 25 --guidance_scale 4 --scheduler ddim
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from fastgen_diffusers import FastPipeline, InstaFlowPipeline
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.training import arguments, run
from fastgen_diffusers.training.prompts import (
    add_prompt_args,
    check_prompt_args,
    cycle_with_empty_prompts,
    describe_prompt_source,
    load_prompts,
)
from fastgen_diffusers.training.reflow import (
    PAIRS_CONFIG_FILE,
    check_pairs_config,
    complete_shards,
    num_shards,
    shard_indices,
    write_pair_shard,
)
from fastgen_diffusers.utils.seeding import image_generator

logger = get_logger(__name__, log_level="INFO")

SCHEDULERS = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = arguments.add_pretrained_model_arg(
        parser, "The teacher: a pipeline folder, a Hub id or an embedded model name (e.g. `shapes-teacher`)."
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
    group.add_argument(
        "--mixed_precision", type=str, default="no", choices=sorted(run.DTYPES), help="Teacher weights."
    )

    group = parser.add_argument_group("pairs")
    group.add_argument("--output_dir", type=str, required=True, help="Where the shards go.")
    group.add_argument("--num_pairs", type=int, required=True)
    group.add_argument("--shard_size", type=int, default=1000, help="Pairs per shard: the unit of resumption.")
    group.add_argument("--batch_size", type=int, default=32, help="Teacher batch size per process.")
    group.add_argument("--seed", type=int, default=0, help="Sample i's noise comes from a generator seeded (seed, i).")
    add_prompt_args(parser)
    parser.add_argument(
        "--empty_prompt_prob",
        type=float,
        default=0.0,
        help="Share of pairs drawn from the empty prompt: the unconditional part of the teacher's training "
        "distribution (its caption dropout), which one-step students also meet.",
    )
    args = parser.parse_args(argv)

    arguments.check_shared_flags(args)
    check_prompt_args(args)
    if not 0.0 <= args.empty_prompt_prob <= 1.0:
        raise ValueError(f"`--empty_prompt_prob` must lie in [0, 1], got {args.empty_prompt_prob}.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # 1. Processes. Like `Accelerator`, honour `accelerate launch --cpu` / ACCELERATE_USE_CPU: without it, CPU
    # processes would not join one process group and each would write every shard.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)

    # 2. The teacher and its sampler.
    location = resolve_model_location(args.pretrained_model_name_or_path)
    dtype = run.DTYPES[args.mixed_precision]
    pipe = FastPipeline.from_pretrained(location, dtype=dtype)
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
    latent_size = resolution // pipe.vae_scale_factor
    noise_shape = (pipe.unet.config.in_channels, latent_size, latent_size)

    # 3. Prompts, and the record of everything that decides a pair's content: a resumed run must match it.
    prompts = cycle_with_empty_prompts(load_prompts(args), args.num_pairs, args.empty_prompt_prob, args.seed)
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
        "prompt_source": describe_prompt_source(args),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
    }
    check_pairs_config(output_dir, config)
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / PAIRS_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state.wait_for_everyone()

    # 4. This process's missing shards.
    done = set(complete_shards(output_dir))
    mine = range(state.process_index, num_shards(args.num_pairs, args.shard_size), state.num_processes)
    todo = [shard for shard in mine if shard not in done]
    logger.info(
        f"{len(done)} shards complete; this process writes {len(todo)} of its {len(mine)}.", main_process_only=False
    )

    # 5. Sample them.
    for shard in tqdm(todo, desc="shards", disable=not state.is_local_main_process):
        indices = shard_indices(shard, args.num_pairs, args.shard_size)
        # Cast before storing, so the stored noise is exactly what the teacher started from.
        noise = torch.stack([torch.randn(noise_shape, generator=image_generator(args.seed, i)) for i in indices])
        noise = noise.to(dtype)
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
