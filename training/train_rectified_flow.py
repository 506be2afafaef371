#!/usr/bin/env python
"""InstaFlow training on reflow pairs: 2-Rectified Flow, or one-step distillation of it (`--distill`).

2-Rectified Flow: from the teacher's UNet, learn the velocity of the straight line between each pair's noise x0 and
the teacher's latent x1: min E ||(x1 - x0) - v(tau x1 + (1 - tau) x0, (1 - tau) 1000)||^2 with tau ~ U(0, 1).
Straight lines that do not cross can be followed in a few Euler steps.

Distillation (`--distill`, from a 2-RF folder, on pairs that 2-RF generated): a one-step student at UNet time 1000,
x1_hat = x0 + v(x0, 1000), matched to the pair's latent in latent space (`--loss l2|pseudo_huber`) or in pixels
through the VAE decoder (`--loss lpips`).

Only the UNet trains (all of it, or a LoRA with `--use_lora`). The output is an `InstaFlowPipeline` folder that
`FastPipeline.from_pretrained` loads, or `pytorch_lora_weights.safetensors` for `load_lora_weights`.

    accelerate launch training/train_rectified_flow.py --pretrained_model_name_or_path shapes-teacher \\
        --pairs_dir runs/pairs-teacher --output_dir runs/shapes-2rf --max_train_steps 4000 \\
        --resume_from_checkpoint latest
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers.image_processor import VaeImageProcessor
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastgen_diffusers import FastPipeline, InstaFlowPipeline, RectifiedFlowEulerScheduler
from fastgen_diffusers.pipelines.auto import resolve_model_location, write_fastgen_metadata
from fastgen_diffusers.pipelines.negative_prompts import DEFAULT_NASA_SCALE
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.checkpointing import checkpoint_step, resolve_resume_path, save_checkpoint
from fastgen_diffusers.training.hub import push_folder_to_hub, save_model_card
from fastgen_diffusers.training.reflow import (
    LOSSES,
    PairCollator,
    latent_loss,
    load_lpips,
    load_pairs,
    lpips_loss,
    one_step_sample,
    reflow_interpolation,
    reflow_target,
    unet_time,
)
from fastgen_diffusers.training.run import constant_lr_scheduler, resumed_batches, start_run
from fastgen_diffusers.training.validation import save_image_grid

logger = get_logger(__name__, log_level="INFO")

PAIRS_CONFIG_FILE = "reflow_pairs.json"  # written by generate_reflow_pairs.py
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Initialisation: the teacher (folder, Hub id or embedded name) for 2-RF, the 2-RF folder for --distill.",
    )
    group.add_argument("--distill", action="store_true", help="Train the one-step student at UNet time 1000.")
    group.add_argument("--use_lora", action="store_true", help="Train a LoRA on the UNet's attention, not the UNet.")
    group.add_argument("--lora_rank", type=int, default=4)
    group = parser.add_argument_group("data")
    group.add_argument("--pairs_dir", type=str, required=True, help="Output of generate_reflow_pairs.py.")
    group = parser.add_argument_group("loss")
    group.add_argument(
        "--loss", type=str, default="l2", choices=LOSSES, help="'lpips' (decoded pixels) needs --distill and `lpips`."
    )
    group.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (default 0.00054 sqrt(dims)).")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--ema_decay", type=float, default=0.999)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group = parser.add_argument_group("inference (validation images and the model's saved default)")
    group.add_argument(
        "--num_inference_steps", type=int, default=None, help="Euler steps (default: 4; 1 with --distill)."
    )
    group.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale; 1 turns it off.")
    group.add_argument(
        "--nasa_scale",
        type=float,
        default=DEFAULT_NASA_SCALE,
        help="Default NASA scale for negative prompts at guidance <= 1, stored in the output pipeline's config.",
    )
    args = parser.parse_args(argv)

    check_common_training_args(args)
    if args.loss == "lpips" and not args.distill:
        raise ValueError("`--loss lpips` compares the one-step student's decoded images; use it with `--distill`.")
    if args.huber_c is not None and args.huber_c <= 0:
        raise ValueError(f"`--huber_c` must be positive, got {args.huber_c}.")
    if args.nasa_scale < 0:
        raise ValueError(f"`--nasa_scale` must be >= 0, got {args.nasa_scale}.")
    if args.lora_rank <= 0:
        raise ValueError(f"`--lora_rank` must be a positive integer, got {args.lora_rank}.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must lie in [0, 1), got {args.ema_decay}.")
    if not Path(args.pairs_dir).is_dir():
        raise ValueError(
            f"`--pairs_dir` {args.pairs_dir!r} is not a folder; write pairs with generate_reflow_pairs.py."
        )
    if args.num_inference_steps is None:
        args.num_inference_steps = 1 if args.distill else 4
    if args.num_inference_steps <= 0:
        raise ValueError(f"`--num_inference_steps` must be a positive integer, got {args.num_inference_steps}.")
    return args


def build_pipeline(base, unet, nasa_scale: float) -> InstaFlowPipeline:
    """The student as an InstaFlowPipeline: its UNet, everything else from the base checkpoint."""
    return InstaFlowPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=RectifiedFlowEulerScheduler(),
        safety_checker=base.components.get("safety_checker"),
        feature_extractor=base.components.get("feature_extractor"),
        default_nasa_scale=nasa_scale,
    )


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Image latents to pixels in [-1, 1]."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def hub_base_model(name: str) -> str | None:
    """`name` for the card's `base_model` metadata if it is a Hub id (not a local folder or an embedded model)."""
    return None if Path(resolve_model_location(name)).exists() or name.count("/") != 1 else name


def usage_snippet(args: argparse.Namespace, prompt: str) -> str:
    location = args.hub_model_id or args.output_dir
    call = f"pipe({prompt!r}, num_inference_steps={args.num_inference_steps}, guidance_scale={args.guidance_scale})"
    if args.use_lora:
        return (
            "from fastgen_diffusers import InstaFlowPipeline, RectifiedFlowEulerScheduler\n\n"
            f"pipe = InstaFlowPipeline.from_pretrained({args.pretrained_model_name_or_path!r}, "
            "scheduler=RectifiedFlowEulerScheduler())\n"
            f"pipe.load_lora_weights({location!r})\n"
            f"image = {call}.images[0]"
        )
    return (
        "from fastgen_diffusers import FastPipeline\n\n"
        f"pipe = FastPipeline.from_pretrained({location!r})  # an InstaFlowPipeline\n"
        f"image = {call}.images[0]"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lpips_model = load_lpips() if args.loss == "lpips" else None  # fail before loading anything else
    output_dir = Path(args.output_dir)
    accelerator = start_run(args)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    base = FastPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=torch.float32)
    missing = [name for name in ("vae", "text_encoder", "tokenizer", "unet") if getattr(base, name, None) is None]
    if missing:
        raise ValueError(
            f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} is a {type(base).__name__} "
            f"without {missing}; give a Stable-Diffusion-family pipeline."
        )
    # The frozen text encoder and VAE stay fp32 (they are saved with the student) and run under autocast.
    vae, text_encoder, unet = base.vae, base.text_encoder, base.unet
    vae.requires_grad_(False).to(accelerator.device)
    text_encoder.requires_grad_(False).to(accelerator.device)
    if args.use_lora:
        unet.requires_grad_(False).to(dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            )
        )
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights in fp32, as Diffusers' LoRA script
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable_params = [p for p in unet.parameters() if p.requires_grad]
    if lpips_model is not None:
        lpips_model.to(accelerator.device)

    with accelerator.main_process_first():  # one process builds the `datasets` cache, the others reuse it
        pairs = load_pairs(args.pairs_dir)
    if pairs.features["latent"].shape[0] != unet.config.in_channels:
        raise ValueError(
            f"`--pairs_dir` holds latents with {pairs.features['latent'].shape[0]} channels; the UNet of "
            f"`--pretrained_model_name_or_path` takes {unet.config.in_channels}."
        )
    pairs_config_path = Path(args.pairs_dir) / PAIRS_CONFIG_FILE
    pairs_config = json.loads(pairs_config_path.read_text()) if pairs_config_path.is_file() else {}
    if len(pairs) < pairs_config.get("num_pairs", 0):
        logger.warning(f"Training on the {len(pairs)} complete pairs of {pairs_config['num_pairs']}.")

    optimizer = torch.optim.AdamW(trainable_params, lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = constant_lr_scheduler(optimizer, accelerator, args.lr_warmup_steps, args.max_train_steps)
    ema = EMAModel(trainable_params, decay=args.ema_decay)
    accelerator.register_for_checkpointing(ema)

    dataloader = DataLoader(
        pairs.with_format("torch"),
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=PairCollator(base.tokenizer),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    unet, optimizer, lr_scheduler, dataloader = accelerator.prepare(unet, optimizer, lr_scheduler, dataloader)
    ema.to(accelerator.device)
    if len(dataloader) == 0:
        raise ValueError(
            f"`--pairs_dir` holds {len(pairs)} pairs, fewer than one batch of `--train_batch_size` "
            f"{args.train_batch_size} per process x {accelerator.num_processes} processes."
        )

    global_step = 0
    resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train_rectified_flow", config={k: v for k, v in vars(args).items() if v is not None}
        )

    # Validation: the student from the noise of the first pairs, above the teacher's images for the same noise.
    validation = pairs.with_format("torch")[: args.num_validation_images]
    if accelerator.is_main_process:
        with torch.no_grad(), accelerator.autocast():
            teacher_pixels = decode(vae, validation["latent"].to(accelerator.device))
        teacher_images = VaeImageProcessor().postprocess(teacher_pixels.float(), output_type="pil")

    def save_validation(name: str) -> None:
        pipeline = build_pipeline(base, accelerator.unwrap_model(unet), args.nasa_scale)
        pipeline.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            images = pipeline(
                validation["prompt"],
                latents=validation["noise"].to(accelerator.device),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
            ).images
        save_image_grid(images + teacher_images, output_dir / "validation" / f"{name}.png", columns=len(images))

    data = resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    while global_step < args.max_train_steps:
        batch = next(data)
        with accelerator.accumulate(unet):
            # The path and its target in fp32 whatever the mixed precision: x1 - x0 is a small difference of large
            # numbers near tau = 1.
            noise, latents = batch["noise"].float(), batch["latents"].float()
            with torch.no_grad(), accelerator.autocast():
                prompt_embeds = text_encoder(batch["input_ids"], return_dict=False)[0]
            if args.distill:
                timesteps = unet_time(torch.zeros(noise.shape[0], device=noise.device))
                velocity = unet(noise, timesteps, prompt_embeds, return_dict=False)[0].float()
                prediction = one_step_sample(noise, velocity)
                if lpips_model is not None:
                    with accelerator.autocast():
                        predicted_pixels = decode(vae, prediction)
                        with torch.no_grad():
                            target_pixels = decode(vae, latents)
                    loss = lpips_loss(lpips_model, predicted_pixels, target_pixels).mean()
                else:
                    loss = latent_loss(args.loss, prediction, latents, args.huber_c).mean()
            else:
                tau = torch.rand(noise.shape[0], device=noise.device)
                noisy = reflow_interpolation(noise, latents, tau)
                velocity = unet(noisy, unet_time(tau), prompt_embeds, return_dict=False)[0].float()
                loss = latent_loss(args.loss, velocity, reflow_target(noise, latents), args.huber_c).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable_params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        if not accelerator.sync_gradients:
            continue
        ema.step(trainable_params)
        global_step += 1
        progress.update(1)
        logs = {
            "loss": accelerator.gather(loss.detach().reshape(1)).mean().item(),
            "lr": lr_scheduler.get_last_lr()[0],
        }
        progress.set_postfix(**logs)
        accelerator.log(logs, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        if accelerator.is_main_process and global_step % args.validation_steps == 0:
            ema.store(trainable_params)
            ema.copy_to(trainable_params)
            save_validation(f"step-{global_step}")
            ema.restore(trainable_params)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.copy_to(trainable_params)
        unet = accelerator.unwrap_model(unet)
        save_validation("final")
        if args.use_lora:
            InstaFlowPipeline.save_lora_weights(
                str(output_dir),
                unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),  # alpha/rank survive the reload
                safe_serialization=True,
            )
        else:
            build_pipeline(base, unet, args.nasa_scale).save_pretrained(str(output_dir))
        stage = "one-step distillation" if args.distill else "2-Rectified Flow"
        default_inference = {
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "nasa_scale": args.nasa_scale,
        }
        write_fastgen_metadata(
            output_dir,
            {
                "method": "instaflow" if args.distill else "2-rectified-flow",
                "default_inference": default_inference,
                **({"lora_base_model": args.pretrained_model_name_or_path} if args.use_lora else {}),
            },
        )
        teacher = pairs_config.get("teacher", "an unrecorded teacher")
        sampler = (
            f"{pairs_config['num_inference_steps']} steps of {pairs_config['scheduler']} at guidance "
            f"{pairs_config['guidance_scale']}"
            if pairs_config
            else "unrecorded settings"
        )
        save_model_card(
            output_dir,
            template="rectified_flow",
            fields={
                "title": f"InstaFlow {stage}" + (" (LoRA)" if args.use_lora else ""),
                "stage": stage,
                "base_model": args.pretrained_model_name_or_path,
                "weights": f"LoRA rank {args.lora_rank} on the UNet's attention projections"
                if args.use_lora
                else "the UNet",
                "loss": args.loss,
                "steps": str(args.max_train_steps),
                "batch_size": str(args.train_batch_size * args.gradient_accumulation_steps),
                "num_processes": str(accelerator.num_processes),
                "num_pairs": str(len(pairs)),
                "pairs_teacher": f"`{teacher}`, {sampler}",
                "num_inference_steps": str(args.num_inference_steps),
                "guidance_scale": str(args.guidance_scale),
                "nasa_scale": f"{args.nasa_scale:g}",
                "usage": usage_snippet(args, validation["prompt"][0]),
                "command": (output_dir / "training_commands.txt").read_text().strip(),
            },
            tags=["text-to-image", "instaflow", "rectified-flow"] + (["lora"] if args.use_lora else []),
            base_model=hub_base_model(args.pretrained_model_name_or_path),
        )
        if args.push_to_hub:
            push_folder_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
    accelerator.end_training()


if __name__ == "__main__":
    main()
