#!/usr/bin/env python
"""Train the ShapesWorld teacher: a tiny Stable Diffusion (CLIP text encoder, AutoencoderKL, UNet) from scratch.

Two stages in one resumable run:
  1. steps [0, vae_train_steps): the VAE, as an autoencoder with a lightly weighted KL term;
  2. the next `max_train_steps`: the VAE is frozen, its `scaling_factor` set so latents have unit
     variance, and the text encoder and UNet learn epsilon prediction under SD's own DDPM
     schedule, with empty and partial captions mixed in for classifier-free guidance and
     partial prompts.

    accelerate launch training/train_teacher.py --output_dir runs/shapes-teacher \\
        --vae_train_steps 800 --max_train_steps 6000 --resume_from_checkpoint latest
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from torch import nn
from torch.utils.data import DataLoader

from fastgen_diffusers.pipelines.auto import write_fastgen_metadata
from fastgen_diffusers.shapes import build_dataset, evaluation_prompts
from fastgen_diffusers.shapes.teacher_config import (
    PREDICTION_TYPES,
    SCALES,
    make_noise_scheduler,
    make_sampling_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
)
from fastgen_diffusers.shapes.tokenizer import build_tokenizer
from fastgen_diffusers.training import arguments, run
from fastgen_diffusers.training.data import TextImageCollator, images_to_tensor
from fastgen_diffusers.training.hub import publish
from fastgen_diffusers.training.snr_weighting import loss_weights
from fastgen_diffusers.training.validation import save_image_grid
from fastgen_diffusers.utils.safe_loading import check_weight_files

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.training_parser(__doc__)
    group = parser.add_argument_group("model")
    group.add_argument("--scale", type=str, default="full", choices=SCALES, help="'micro' is for tests only.")
    group = parser.add_argument_group("data")
    group.add_argument("--num_train_samples", type=int, default=200_000, help="Rows in the training split.")
    group.add_argument("--partial_caption_prob", type=float, default=0.3)
    group.add_argument("--empty_caption_prob", type=float, default=0.1, help="Caption dropout for CFG.")
    group = parser.add_argument_group("vae stage")
    group.add_argument("--vae_train_steps", type=int, default=1200)
    group.add_argument(
        "--vae_from",
        type=str,
        default=None,
        help="A trained VAE folder (e.g. a previous run's `vae/`) to use instead of the VAE stage; "
        "needs --vae_train_steps 0. Its latent scale is measured again.",
    )
    group.add_argument("--vae_learning_rate", type=float, default=2e-3)
    group.add_argument("--kl_weight", type=float, default=1e-6)
    group = parser.add_argument_group("unet stage")
    group.add_argument(
        "--prediction_type",
        type=str,
        default="v_prediction",
        choices=PREDICTION_TYPES,
        help="What the UNet predicts on SD's schedule: 'epsilon' (SD 1.x) or 'v_prediction' (SD 2.x-v).",
    )
    group.add_argument("--learning_rate", type=float, default=5e-4)
    group.add_argument("--lr_warmup_steps", type=int, default=200)
    group.add_argument("--snr_gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 turns it off.")
    group.add_argument(
        "--snr_floor",
        type=float,
        default=0.0,
        help="Least weight of x0 errors at high noise (0 = off); see `loss_weights`.",
    )
    group.add_argument(
        "--high_noise_fraction",
        type=float,
        default=0.0,
        help="Share of each batch whose timesteps are drawn from [--high_noise_start, 1000) instead of [0, 1000).",
    )
    group.add_argument("--high_noise_start", type=int, default=600)
    group.add_argument("--ema_decay", type=float, default=0.999)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    arguments.check_common_training_args(args)
    if not 0.0 <= args.high_noise_fraction <= 1.0:
        raise ValueError(f"`--high_noise_fraction` must lie in [0, 1], got {args.high_noise_fraction}.")
    if args.snr_floor < 0:
        raise ValueError(f"`--snr_floor` must be >= 0, got {args.snr_floor}.")
    if args.vae_from is None and args.vae_train_steps <= 0:
        raise ValueError(f"`--vae_train_steps` must be positive, got {args.vae_train_steps}.")
    if args.vae_from is not None and args.vae_train_steps != 0:
        raise ValueError(
            f"`--vae_from` replaces the VAE stage: pass `--vae_train_steps 0`, got {args.vae_train_steps}."
        )
    return args


class VAEWithKL(nn.Module):
    """One forward for the VAE stage, so DDP sees the whole graph: reconstruction and KL."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixel_values).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return reconstruction, posterior.kl().mean()


def vae_loss(reconstruction: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 with the shape's pixels weighted up, plus an image-gradient term, plus a light KL.

    A shape covers ~5% of the image: unweighted, the loss is all background and a short run
    decodes every shape as a faint blob of the wrong colour. The gradient term keeps corners.
    """
    background = target.flatten(2).median(dim=2).values[:, :, None, None]
    is_shape = ((target - background).abs().mean(dim=1, keepdim=True) > 0.1).float()
    l1 = ((reconstruction - target).abs() * (1.0 + 20.0 * is_shape)).mean()
    dx = F.l1_loss(reconstruction.diff(dim=-1), target.diff(dim=-1))
    dy = F.l1_loss(reconstruction.diff(dim=-2), target.diff(dim=-2))
    return l1 + 0.5 * (dx + dy) + kl_weight * kl


def sample_timesteps(
    batch_size: int, num_timesteps: int, high_noise_fraction: float, high_noise_start: int
) -> torch.Tensor:
    """Uniform timesteps, with a share drawn from the noisiest range only.

    Layout (where the shape sits) is decided at high noise, where SD's schedule leaves the loss
    almost blind to it: without extra samples there, position follows the initial noise, not the
    prompt. Diffusers' SDXL script offers the same idea as `--timestep_bias_strategy later`.
    """
    timesteps = torch.randint(0, num_timesteps, (batch_size,))
    high = torch.randint(high_noise_start, num_timesteps, (batch_size,))
    return torch.where(torch.rand(batch_size) < high_noise_fraction, high, timesteps)


@torch.no_grad()
def latent_scaling_factor(vae, pixel_values: torch.Tensor) -> float:
    """1 / std of the posterior means, so the diffusion model sees unit-variance latents (SD's 0.18215)."""
    return float(1.0 / vae.encode(pixel_values).latent_dist.mean.std())


def freeze_vae(vae, pixel_values: torch.Tensor) -> None:
    """End of the VAE stage: freeze it and fix the latent scale (recomputed the same way after a resume)."""
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixel_values))
    logger.info(f"VAE frozen; scaling_factor = {vae.config.scaling_factor:.4f}")


def build_pipeline(vae, text_encoder, tokenizer, unet, prediction_type: str) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sampling_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # 1. The run: accelerator, seed, recorded command.
    accelerator = run.start_run(args)

    # 2. Models, from scratch: the VAE trains first, then the text encoder and UNet.
    with tempfile.TemporaryDirectory() as tokenizer_files:
        tokenizer = build_tokenizer(tokenizer_files)
    text_encoder, unet = make_text_encoder(tokenizer, args.scale), make_unet(args.scale)
    if args.vae_from is not None:
        check_weight_files(args.vae_from)  # safetensors only: a pickle is refused, a damaged file named
        # Frozen at the first UNet step, as a trained one.
        vae = AutoencoderKL.from_pretrained(args.vae_from, use_safetensors=True).train()
    else:
        vae = make_vae(args.scale)
        # Start the posterior nearly deterministic (std ~0.05): with SD's init (std 1) the decoder sees
        # latents drowned in sampling noise and a short run never learns the small shapes.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    noise_scheduler = make_noise_scheduler(args.prediction_type)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    # 3. Optimisers and the EMA of the diffusion model.
    vae_step = VAEWithKL(vae)
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate)
    diffusion_params = list(itertools.chain(unet.parameters(), text_encoder.parameters()))
    optimizer = torch.optim.AdamW(diffusion_params, lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = run.constant_lr_scheduler(optimizer, accelerator, args.lr_warmup_steps, args.max_train_steps)
    ema = EMAModel(diffusion_params, decay=args.ema_decay)
    accelerator.register_for_checkpointing(ema)

    # 4. Data: ShapesWorld images and captions, drawn on access.
    dataset = build_dataset(
        args.num_train_samples,
        seed=args.seed,
        split="train",
        partial_caption_prob=args.partial_caption_prob,
        empty_caption_prob=args.empty_caption_prob,
    )
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=TextImageCollator(tokenizer),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )

    # 5. Prepare, and the resumed state.
    vae_step, vae_optimizer, unet, text_encoder, optimizer, lr_scheduler, dataloader = accelerator.prepare(
        vae_step, vae_optimizer, unet, text_encoder, optimizer, lr_scheduler, dataloader
    )
    ema.to(accelerator.device)
    total_steps = args.vae_train_steps + args.max_train_steps
    global_step = run.resume_or_seed(accelerator, args, "train_teacher")

    # Fixed images that set the latent scale: the same on every resume.
    scale_batch = images_to_tensor(build_dataset(512, seed=args.seed + 1, split="train")[:]["image"])
    scale_batch = scale_batch.to(accelerator.device)
    raw_vae = accelerator.unwrap_model(vae_step).vae
    validation_prompts = [p.caption for p in evaluation_prompts(args.num_validation_images, seed=args.seed)]

    def trained_pipeline() -> StableDiffusionPipeline:
        """The text encoder and UNet as they are now, behind the frozen VAE."""
        trained = {"text_encoder": accelerator.unwrap_model(text_encoder), "unet": accelerator.unwrap_model(unet)}
        return build_pipeline(vae=raw_vae, tokenizer=tokenizer, prediction_type=args.prediction_type, **trained)

    # 6. Training: the VAE stage, then the UNet stage.
    data = run.resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    progress = run.progress_bar(accelerator, total_steps, global_step)
    samples = []  # for the step journal: each image identifies its row
    while global_step < total_steps:
        batch = next(data)
        samples.append(run.fingerprints(batch["pixel_values"]))
        if global_step < args.vae_train_steps:
            with accelerator.accumulate(vae_step):
                reconstruction, kl = vae_step(batch["pixel_values"])
                loss = vae_loss(reconstruction, batch["pixel_values"], kl, args.kl_weight)
                accelerator.backward(loss)
                vae_optimizer.step()
                vae_optimizer.zero_grad()
        else:
            if raw_vae.training:  # first UNet step of this process
                freeze_vae(raw_vae, scale_batch)
            with accelerator.accumulate(unet, text_encoder):
                with torch.no_grad():
                    latents = raw_vae.encode(batch["pixel_values"]).latent_dist.sample()
                    latents = latents * raw_vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = sample_timesteps(
                    latents.shape[0],
                    noise_scheduler.config.num_train_timesteps,
                    args.high_noise_fraction,
                    args.high_noise_start,
                ).to(latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                if args.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                snr = compute_snr(noise_scheduler, timesteps)
                weights = loss_weights(snr, args.snr_gamma, args.snr_floor, args.prediction_type)
                loss = (loss * weights).mean()
                run.optimizer_step(accelerator, loss, diffusion_params, optimizer, lr_scheduler, args.max_grad_norm)

        if not accelerator.sync_gradients:
            continue
        if global_step >= args.vae_train_steps:
            ema.step(diffusion_params)
        global_step += 1
        logs = {**run.mean_over_processes(accelerator, loss=loss), "stage": int(global_step > args.vae_train_steps)}
        validation_due = run.end_step(accelerator, args, progress, global_step, logs, total_steps, samples)
        if validation_due and global_step > args.vae_train_steps:
            generator = torch.Generator().manual_seed(args.seed)
            with run.ema_weights(ema, diffusion_params):
                pipeline = trained_pipeline()
                pipeline.set_progress_bar_config(disable=True)
                images = pipeline(validation_prompts, num_inference_steps=25, guidance_scale=4.0, generator=generator)
            save_image_grid(images.images, output_dir / "validation" / f"step-{global_step}.png")

    # 7. The EMA model as a StableDiffusionPipeline folder, its default sampler and its card.
    accelerator.wait_for_everyone()
    if raw_vae.training:  # resumed at the last step: the loop never ran
        freeze_vae(raw_vae, scale_batch)
    if accelerator.is_main_process:
        ema.copy_to(diffusion_params)
        trained_pipeline().save_pretrained(str(output_dir))
        default_inference = {"num_inference_steps": 25, "guidance_scale": 4.0}
        write_fastgen_metadata(output_dir, {"method": "teacher", "default_inference": default_inference})
        publish(
            args,
            template="shapes_teacher",
            fields={
                "prediction": args.prediction_type,
                "steps": str(args.max_train_steps),
                "vae_steps": str(args.vae_train_steps) if args.vae_from is None else f"0 (VAE from `{args.vae_from}`)",
            },
            tags=["text-to-image", "stable-diffusion", "shapesworld"],
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
