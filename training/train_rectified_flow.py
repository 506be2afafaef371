#!/usr/bin/env python
"""InstaFlow training on reflow pairs: 2-Rectified Flow, or one-step distillation of it (`--distill`).

2-Rectified Flow: from the teacher's UNet, learn the velocity of the straight line between each pair's noise x0 and
the teacher's latent x1: min E ||(x1 - x0) - v(tau x1 + (1 - tau) x0, (1 - tau) 1000)||^2 with tau ~ U(0, 1)
(or `--time_sampling`: Lee et al.'s U-shaped or SD3's logit-normal noise levels).
Straight lines that do not cross can be followed in a few Euler steps. The path, its velocity and the UNet time are
those of `RectifiedFlowEulerScheduler`, the scheduler the model samples with.

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
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers.image_processor import VaeImageProcessor
from diffusers.training_utils import EMAModel, cast_training_params
from torch.utils.data import DataLoader

from fastgen_diffusers import FastPipeline, InstaFlowPipeline, RectifiedFlowEulerScheduler
from fastgen_diffusers.pipelines.auto import write_fastgen_metadata
from fastgen_diffusers.training import arguments, reflow, run
from fastgen_diffusers.training.hub import publish
from fastgen_diffusers.training.lora import save_unet_lora, unet_lora_config
from fastgen_diffusers.training.validation import save_image_grid

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.training_parser(__doc__)
    group = arguments.add_pretrained_model_arg(
        parser,
        "Initialisation: the teacher (a folder, Hub id or embedded name) for 2-RF; the 2-RF folder for --distill.",
    )
    group.add_argument("--distill", action="store_true", help="Train the one-step student at UNet time 1000.")
    group.add_argument("--use_lora", action="store_true", help="Train a LoRA on the UNet's attention, not the UNet.")
    group.add_argument("--lora_rank", type=int, default=4)
    group = parser.add_argument_group("data")
    group.add_argument("--pairs_dir", type=str, required=True, help="Output of generate_reflow_pairs.py.")
    group.add_argument(
        "--max_pairs",
        type=int,
        default=None,
        help="Train on the first N complete pairs only (pairs are numbered in shard order): for the gap against the"
        " number of pairs.",
    )
    group = parser.add_argument_group("loss")
    group.add_argument(
        "--loss",
        type=str,
        default="l2",
        choices=reflow.LOSSES,
        help="'lpips' (decoded pixels) needs --distill and `lpips`.",
    )
    group.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (default 0.00054 sqrt(dims)).")
    group.add_argument(
        "--time_sampling",
        type=str,
        default="uniform",
        choices=reflow.TIME_SAMPLINGS,
        help="How 2-RF draws its training noise levels: uniform (InstaFlow), u_shaped (Lee et al.: both ends of the"
        " path), logit_normal (SD3; --logit_mean > 0 favours high noise).",
    )
    group.add_argument("--u_shape_a", type=float, default=4.0, help="Sharpness of the U-shaped distribution.")
    group.add_argument("--logit_mean", type=float, default=0.0)
    group.add_argument("--logit_std", type=float, default=1.0)
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
        "--shift",
        type=float,
        default=1.0,
        help="The saved scheduler's shift of its uniform grid toward high noise (RectifiedFlowEulerScheduler); 1 keeps"
        " InstaFlow's grid, 3 gives sigma = 1, 0.9, 0.75, 0.5 at 4 steps.",
    )
    arguments.add_nasa_scale_arg(group)
    args = parser.parse_args(argv)

    arguments.check_common_training_args(args)
    if args.loss == "lpips" and not args.distill:
        raise ValueError("`--loss lpips` compares the one-step student's decoded images; use it with `--distill`.")
    arguments.check_positive(
        args, "huber_c", "lora_rank", "num_inference_steps", "max_pairs", "u_shape_a", "logit_std", "shift"
    )
    if args.distill and args.time_sampling != "uniform":
        raise ValueError(
            "`--time_sampling` chooses 2-RF's training noise levels; `--distill` trains at pure noise only."
        )
    arguments.check_non_negative(args, "nasa_scale")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must lie in [0, 1), got {args.ema_decay}.")
    if not Path(args.pairs_dir).is_dir():
        raise ValueError(
            f"`--pairs_dir` {args.pairs_dir!r} is not a folder; write pairs with generate_reflow_pairs.py."
        )
    if args.num_inference_steps is None:
        args.num_inference_steps = 1 if args.distill else 4
    return args


def build_pipeline(base, unet, scheduler: RectifiedFlowEulerScheduler, nasa_scale: float) -> InstaFlowPipeline:
    """The student as an InstaFlowPipeline: its UNet, everything else from the base checkpoint."""
    return InstaFlowPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=base.components.get("safety_checker"),
        feature_extractor=base.components.get("feature_extractor"),
        negative_attention={"method": "nasa", "scale": nasa_scale},
    )


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Image latents to pixels in [-1, 1]."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def usage_snippet(args: argparse.Namespace, prompt: str) -> str:
    location = args.hub_model_id or args.output_dir
    call = f"pipe({prompt!r}, num_inference_steps={args.num_inference_steps}, guidance_scale={args.guidance_scale})"
    if args.use_lora:
        return (
            "from fastgen_diffusers import InstaFlowPipeline, RectifiedFlowEulerScheduler\n\n"
            f"pipe = InstaFlowPipeline.from_pretrained({args.pretrained_model_name_or_path!r}, "
            f"scheduler=RectifiedFlowEulerScheduler(shift={args.shift}))\n"
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
    if not reflow.complete_shards(args.pairs_dir):  # fail before loading anything
        raise ValueError(f"`--pairs_dir` {args.pairs_dir!r} holds no complete shard; run generate_reflow_pairs.py.")
    lpips_model = reflow.load_lpips() if args.loss == "lpips" else None  # fail before loading anything else
    output_dir = Path(args.output_dir)

    # 1. The run: accelerator, seed, recorded command.
    accelerator = run.start_run(args)
    weight_dtype = run.DTYPES[accelerator.mixed_precision]

    # 2. Models. The frozen text encoder and VAE stay fp32 (they are saved with the student) and run under autocast;
    # the UNet trains, or a LoRA on it. The scheduler holds the path, its velocity and the UNet time.
    base = FastPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=torch.float32)
    missing = [name for name in ("vae", "text_encoder", "tokenizer", "unet") if getattr(base, name, None) is None]
    if missing:
        raise ValueError(
            f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} is a {type(base).__name__} "
            f"without {missing}; give a Stable-Diffusion-family pipeline."
        )
    vae, text_encoder, unet = base.vae, base.text_encoder, base.unet
    scheduler = RectifiedFlowEulerScheduler(shift=args.shift)
    num_train_timesteps = scheduler.config.num_train_timesteps
    vae.requires_grad_(False).to(accelerator.device)
    text_encoder.requires_grad_(False).to(accelerator.device)
    if args.use_lora:
        unet.requires_grad_(False).to(dtype=weight_dtype)
        unet.add_adapter(unet_lora_config(args.lora_rank, args.lora_rank))
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights in fp32, as Diffusers' LoRA script
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable_params = [p for p in unet.parameters() if p.requires_grad]
    if lpips_model is not None:
        lpips_model.to(accelerator.device)

    # 3. Data: the reflow pairs.
    with accelerator.main_process_first():  # one process builds the `datasets` cache, the others reuse it
        pairs = reflow.load_pairs(args.pairs_dir)
    if pairs.features["latent"].shape[0] != unet.config.in_channels:
        raise ValueError(
            f"`--pairs_dir` holds latents with {pairs.features['latent'].shape[0]} channels; the UNet of "
            f"`--pretrained_model_name_or_path` takes {unet.config.in_channels}."
        )
    pairs_config = reflow.read_pairs_config(args.pairs_dir)
    wanted = pairs_config.get("num_pairs", 0)
    if args.max_pairs is not None:
        wanted = min(wanted, args.max_pairs)
        pairs = pairs.select(range(min(args.max_pairs, len(pairs))))
    if len(pairs) < wanted:  # generation still running, or stopped early
        logger.warning(f"Training on the {len(pairs)} complete pairs of the {wanted} asked for.")
    dataloader = DataLoader(
        pairs.with_format("torch"),
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=reflow.PairCollator(base.tokenizer),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),  # also what a resumed run draws from: not the global RNG
    )

    # 4. Optimiser, EMA, and the resumed state.
    optimizer = torch.optim.AdamW(trainable_params, lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = run.constant_lr_scheduler(optimizer, accelerator, args.lr_warmup_steps, args.max_train_steps)
    ema = EMAModel(trainable_params, decay=args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    unet, optimizer, lr_scheduler, dataloader = accelerator.prepare(unet, optimizer, lr_scheduler, dataloader)
    ema.to(accelerator.device)
    if len(dataloader) == 0:
        raise ValueError(
            f"`--pairs_dir` holds {len(pairs)} pairs, fewer than one batch of `--train_batch_size` "
            f"{args.train_batch_size} per process x {accelerator.num_processes} processes."
        )
    global_step = run.resume_or_seed(accelerator, args, "train_rectified_flow")

    # 5. Validation: the student from the noise of the first pairs, above the teacher's images for the same noise.
    validation = pairs.with_format("torch")[: args.num_validation_images]
    if accelerator.is_main_process:
        with torch.no_grad(), accelerator.autocast():
            teacher_pixels = decode(vae, validation["latent"].to(accelerator.device))
        teacher_images = VaeImageProcessor().postprocess(teacher_pixels.float(), output_type="pil")

    def save_validation(name: str) -> None:
        pipeline = build_pipeline(base, accelerator.unwrap_model(unet), scheduler, args.nasa_scale)
        pipeline.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            images = pipeline(
                validation["prompt"],
                latents=validation["noise"].to(accelerator.device),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
            ).images
        save_image_grid(images + teacher_images, output_dir / "validation" / f"{name}.png", columns=len(images))

    # 6. Training. The path and its target in fp32 whatever the mixed precision: x1 - x0 is a small difference of
    # large numbers near tau = 1.
    data = run.resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    progress = run.progress_bar(accelerator, args.max_train_steps, global_step)
    samples = []  # for the step journal: each pair's noise identifies it
    while global_step < args.max_train_steps:
        batch = next(data)
        samples.append(run.fingerprints(batch["noise"]))
        with accelerator.accumulate(unet):
            noise, latents = batch["noise"].float(), batch["latents"].float()
            batch_size = noise.shape[0]
            with torch.no_grad(), accelerator.autocast():
                prompt_embeds = text_encoder(batch["input_ids"], return_dict=False)[0]
            if args.distill:
                timesteps = torch.full((batch_size,), float(num_train_timesteps), device=noise.device)  # pure noise
                velocity = unet(noise, timesteps, prompt_embeds, return_dict=False)[0].float()
                prediction = reflow.one_step_sample(noise, velocity)
                if lpips_model is not None:
                    with accelerator.autocast():
                        predicted_pixels = decode(vae, prediction)
                        with torch.no_grad():
                            target_pixels = decode(vae, latents)
                    loss = reflow.lpips_loss(lpips_model, predicted_pixels, target_pixels).mean()
                else:
                    loss = reflow.latent_loss(args.loss, prediction, latents, args.huber_c).mean()
            else:
                sigma = reflow.sample_noise_levels(
                    args.time_sampling, batch_size, noise.device, args.u_shape_a, args.logit_mean, args.logit_std
                )
                timesteps = sigma * num_train_timesteps
                noisy = scheduler.scale_noise(latents, timesteps, noise)
                velocity = unet(noisy, timesteps, prompt_embeds, return_dict=False)[0].float()
                target = scheduler.get_velocity(latents, noise)
                loss = reflow.latent_loss(args.loss, velocity, target, args.huber_c).mean()
            run.optimizer_step(accelerator, loss, trainable_params, optimizer, lr_scheduler, args.max_grad_norm)

        if not accelerator.sync_gradients:
            continue
        ema.step(trainable_params)
        global_step += 1
        logs = {**run.mean_over_processes(accelerator, loss=loss), "lr": lr_scheduler.get_last_lr()[0]}
        if run.end_step(accelerator, args, progress, global_step, logs, samples=samples):
            with run.ema_weights(ema, trainable_params):
                save_validation(f"step-{global_step}")

    # 7. The EMA model: an InstaFlowPipeline folder (or its LoRA), its default sampler, and its card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.copy_to(trainable_params)
        unet = accelerator.unwrap_model(unet)
        save_validation("final")
        if args.use_lora:
            save_unet_lora(InstaFlowPipeline, unet, output_dir)
        else:
            build_pipeline(base, unet, scheduler, args.nasa_scale).save_pretrained(str(output_dir))
        default_inference = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
        method = "instaflow" if args.distill else "2-rectified-flow"
        write_fastgen_metadata(output_dir, {"method": method, "default_inference": default_inference})
        stage = "one-step distillation" if args.distill else "2-Rectified Flow"
        teacher = pairs_config.get("teacher", "an unrecorded teacher")
        sampler = (
            f"{pairs_config['num_inference_steps']} steps of {pairs_config['scheduler']} at guidance "
            f"{pairs_config['guidance_scale']}"
            if pairs_config
            else "unrecorded settings"
        )
        publish(
            args,
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
            },
            tags=["text-to-image", "instaflow", "rectified-flow"] + (["lora"] if args.use_lora else []),
            base_model=args.pretrained_model_name_or_path,
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
