#!/usr/bin/env python
"""Distil a model's VAE decoder into a Diffusers `AutoencoderTiny` (TAESD-style): latent in, image out.

At one step the UNet is no longer the main cost of a text-to-image call; the VAE decoder is. This script trains
the decoder half of an `AutoencoderTiny` to reproduce the full decoder's image from the model's own latents:
images of a dataset encoded by the model's VAE (plus a little Gaussian noise, so that generated latents, which
never sit exactly on the encoder's outputs, are covered too), and optionally latents that few-step models sharing
that VAE generate themselves (`--generated_latents_from`: the latents the decoder will actually be handed, which lie
partly outside the encoder's). The target is the full decoder's output, not the dataset image: the tiny decoder
copies the decoder, errors included. Besides the pixel loss, two optional terms weigh what a reader of the images
is most sensitive to: the image's mean level (`--level_loss_weight`; on ShapesWorld the background is most of the
image) and its edges (`--edge_loss_weight`, the error of horizontal and vertical pixel differences).

Latent convention (what pipelines hand it): every pipeline decodes with
`vae.decode(latents / vae.config.scaling_factor)`. The saved decoder has `scaling_factor = 1.0`, as TAESD, and is
trained on the *scaled* diffusion latents, so `latents / 1.0` is exactly what it was trained on and
`pipe.vae = AutoencoderTiny.from_pretrained(...)` needs nothing else. Only the decoder is trained: the encoder of
the saved model is a minimal untrained stub (`AutoencoderTiny` always has one); encode with the full VAE.

    accelerate launch training/train_tiny_decoder.py --pretrained_model_name_or_path shapes-teacher \\
        --dataset_name shapesworld --output_dir runs/shapes-tiny-decoder --max_train_steps 3000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image
from torch.utils.data import DataLoader

from fastgen_diffusers.pipelines.auto import resolve_model_location
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.data import images_to_tensor
from fastgen_diffusers.training.hub import hub_base_model, push_to_hub_or_exit, save_model_card
from fastgen_diffusers.training.run import (
    end_step,
    fingerprints,
    mean_over_processes,
    optimizer_step,
    progress_bar,
    resume_or_seed,
    resumed_batches,
    start_run,
)
from fastgen_diffusers.training.validation import save_image_grid
from fastgen_diffusers.utils.safe_loading import check_weight_files


SHAPESWORLD = "shapesworld"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The model whose VAE decoder is distilled: an embedded name, a pipeline folder or a Hub id.",
    )
    parser.add_argument("--vae_subfolder", default="vae", help="Subfolder of the VAE in that model ('' for none).")
    parser.add_argument(
        "--dataset_name",
        default=None,
        help=f"`{SHAPESWORLD}` (drawn on the fly) or a `datasets` image set on the Hub.",
    )
    parser.add_argument("--train_data_dir", default=None, help="A folder of images (loaded as `imagefolder`).")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--num_train_samples", type=int, default=200_000, help=f"Size of the `{SHAPESWORLD}` set.")
    parser.add_argument("--resolution", type=int, default=None, help="Image side (default: the VAE's sample_size).")
    parser.add_argument("--decoder_block_out_channels", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--num_decoder_blocks", type=int, nargs="+", default=[3, 1])
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--loss", choices=["l1", "l2"], default="l1")
    parser.add_argument(
        "--edge_loss_weight",
        type=float,
        default=0.0,
        help="Weight of the L1 error of horizontal and vertical pixel differences (sharp, correctly placed edges).",
    )
    parser.add_argument(
        "--level_loss_weight",
        type=float,
        default=0.0,
        help="Weight of the L1 error of each image's per-channel mean (the overall and background level).",
    )
    parser.add_argument(
        "--init_decoder",
        default=None,
        help="Start from this AutoencoderTiny's decoder (name or folder; same widths and blocks) instead of at random.",
    )
    parser.add_argument(
        "--generated_latents_from",
        nargs="+",
        default=[],
        help="Pipelines (names or folders) sharing the VAE whose own generated latents join the training batches,"
        " sampled with each model's default steps and guidance from training-split ShapesWorld captions.",
    )
    parser.add_argument(
        "--generated_fraction",
        type=float,
        default=0.5,
        help="Share of each batch taken from `--generated_latents_from` (the rest: encoded dataset images).",
    )
    parser.add_argument(
        "--latent_noise_std",
        type=float,
        default=0.2,
        help="Largest std of Gaussian noise added to scaled latents (each sample draws a std in [0, this]).",
    )
    parser.add_argument("--num_eval_samples", type=int, default=512, help="Held-out images for the final error.")
    parser.add_argument("--save_dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the saved model.")
    args = parser.parse_args(argv)
    check_common_training_args(args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError(
            "Give exactly one of `--dataset_name` (a Hub image set or 'shapesworld') and `--train_data_dir`."
        )
    if len(args.decoder_block_out_channels) != len(args.num_decoder_blocks):
        raise ValueError("`--decoder_block_out_channels` and `--num_decoder_blocks` must have the same length.")
    if len(set(args.decoder_block_out_channels)) != 1:
        raise ValueError(
            "`--decoder_block_out_channels` must repeat one width (Diffusers' DecoderTiny keeps the width between "
            f"blocks), got {args.decoder_block_out_channels}."
        )
    if args.latent_noise_std < 0:
        raise ValueError(f"`--latent_noise_std` must be >= 0, got {args.latent_noise_std}.")
    for name in ("edge_loss_weight", "level_loss_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if args.generated_latents_from and not 0 < args.generated_fraction < 1:
        raise ValueError(f"`--generated_fraction` must lie strictly between 0 and 1, got {args.generated_fraction}.")
    return args


def load_vae(args: argparse.Namespace) -> AutoencoderKL:
    location = resolve_model_location(args.pretrained_model_name_or_path)
    check_weight_files(Path(location) / (args.vae_subfolder or ""))  # safetensors only; a damaged file is named
    vae = AutoencoderKL.from_pretrained(
        location, subfolder=args.vae_subfolder or None, torch_dtype=torch.float32, use_safetensors=True
    )
    return vae.requires_grad_(False).eval()


def make_tiny_decoder(vae: AutoencoderKL, block_out_channels: list[int], num_blocks: list[int]) -> AutoencoderTiny:
    """An `AutoencoderTiny` whose decoder matches `vae`'s upsampling; its encoder is a minimal unused stub.

    The number of decoder blocks sets the upsampling (2 ** (blocks - 1)), which must equal the full VAE's, since
    pipelines size latents by `2 ** (len(vae.config.block_out_channels) - 1)`.
    """
    vae_upsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    if 2 ** (len(block_out_channels) - 1) != vae_upsampling:
        raise ValueError(
            f"The VAE upsamples {vae_upsampling}x, so the tiny decoder needs {len(vae.config.block_out_channels)} "
            f"blocks, got {len(block_out_channels)}."
        )
    stub_width = 8
    return AutoencoderTiny(
        in_channels=vae.config.in_channels,
        out_channels=vae.config.out_channels,
        latent_channels=vae.config.latent_channels,
        encoder_block_out_channels=(stub_width,) * len(block_out_channels),
        num_encoder_blocks=(1,) * len(block_out_channels),
        decoder_block_out_channels=tuple(block_out_channels),
        num_decoder_blocks=tuple(num_blocks),
        scaling_factor=1.0,  # takes the scaled diffusion latents the pipelines hand over (latents / 1.0)
    )


def load_images(args: argparse.Namespace, split: str = "train", num_samples: int | None = None) -> datasets.Dataset:
    """The image set whose latents the decoder learns, with an `image` column of PIL images."""
    if args.dataset_name == SHAPESWORLD:
        from fastgen_diffusers.shapes import build_dataset

        return build_dataset(num_samples or args.num_train_samples, seed=args.seed, split=split)
    if args.train_data_dir is not None:
        dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
    else:
        dataset = datasets.load_dataset(args.dataset_name, split="train")
    if args.image_column not in dataset.column_names:
        raise ValueError(f"`--image_column` {args.image_column!r} is not a column; columns: {dataset.column_names}.")
    dataset = dataset.select_columns([args.image_column]).rename_column(args.image_column, "image")
    held_out = min(args.num_eval_samples, len(dataset) // 10)  # the last images, never trained on
    if split == "eval":
        return dataset.select(range(len(dataset) - held_out, len(dataset))[: num_samples or held_out])
    return dataset.select(range(len(dataset) - held_out))


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` and crop the centre square."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    if scale != 1:
        image = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
        )
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class PixelCollator:
    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, rows: list[dict]) -> torch.Tensor:
        return images_to_tensor([center_square(row["image"], self.resolution) for row in rows])


@torch.no_grad()
def teacher_latents_and_images(
    vae: AutoencoderKL, pixels: torch.Tensor, noise_std: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents (the pipelines' convention) of `pixels`, perturbed by up to `noise_std`, and the full
    decoder's images of exactly those latents, clamped to [-1, 1] as the pipelines' post-processing does."""
    latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    if noise_std > 0:
        std = torch.rand(latents.shape[0], 1, 1, 1, generator=generator, device=latents.device) * noise_std
        latents = latents + std * torch.randn(latents.shape, generator=generator, device=latents.device)
    images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    return latents, images


def reconstruction_loss(
    prediction: torch.Tensor, target: torch.Tensor, kind: str, edge_weight: float = 0.0, level_weight: float = 0.0
) -> torch.Tensor:
    """Pixel loss, plus the L1 error of neighbouring-pixel differences (edges) and of each image's channel means
    (level), each weighted."""
    loss = F.l1_loss(prediction, target) if kind == "l1" else F.mse_loss(prediction, target)
    if edge_weight:
        for dim in (-1, -2):
            loss = loss + edge_weight * F.l1_loss(prediction.diff(dim=dim), target.diff(dim=dim))
    if level_weight:
        loss = loss + level_weight * F.l1_loss(prediction.mean(dim=(-2, -1)), target.mean(dim=(-2, -1)))
    return loss


class GeneratedLatents:
    """Latents that models sharing the VAE generate themselves, from training-split ShapesWorld captions.

    The pipelines return their latents before the decode (`output_type="latent"`): scaled diffusion latents, the
    pipelines' convention, which is what the tiny decoder takes. The models take turns by batch index, so a
    resumed run asks the same model as an uninterrupted one.
    """

    def __init__(self, names: list[str], device: torch.device, seed: int, num_captions: int = 50_000):
        from fastgen_diffusers import FastPipeline
        from fastgen_diffusers.pipelines.auto import read_fastgen_metadata
        from fastgen_diffusers.shapes import build_dataset

        self.pipes = []
        for name in names:
            pipe = FastPipeline.from_pretrained(resolve_model_location(name), torch_dtype=torch.float32).to(device)
            pipe.set_progress_bar_config(disable=True)
            defaults = read_fastgen_metadata(resolve_model_location(name)).get("default_inference", {})
            self.pipes.append(
                (pipe, {k: v for k, v in defaults.items() if k in ("num_inference_steps", "guidance_scale")})
            )
        self.captions = build_dataset(num_captions, seed=seed, split="train").with_format(None)["caption"]

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator, batch_index: int) -> torch.Tensor:
        pipe, settings = self.pipes[batch_index % len(self.pipes)]
        picks = torch.randint(len(self.captions), (count,), generator=generator, device=generator.device)
        prompts = [self.captions[i] for i in picks.tolist()]
        return pipe(prompt=prompts, generator=generator, output_type="latent", **settings).images


@torch.no_grad()
def decoder_error(vae: AutoencoderKL, tiny: AutoencoderTiny, pixels: torch.Tensor) -> dict[str, float]:
    """Pixel error of the tiny decoder against the full decoder on the same (unperturbed) latents, in 0-255 units
    after the pipelines' clamp, and the full decoder's own error against the images."""
    latents, full = teacher_latents_and_images(vae, pixels, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    fast = tiny.decode(latents / tiny.config.scaling_factor).sample.float().clamp(-1, 1)
    to_255 = 127.5
    return {
        "tiny_vs_full_mae": (fast - full).abs().mean().item() * to_255,
        "tiny_vs_full_rmse": (fast - full).pow(2).mean().sqrt().item() * to_255,
        "full_vs_image_mae": (full - pixels).abs().mean().item() * to_255,
    }


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = start_run(args)
    vae = load_vae(args).to(accelerator.device)
    resolution = args.resolution or vae.config.sample_size
    tiny = make_tiny_decoder(vae, args.decoder_block_out_channels, args.num_decoder_blocks)
    if args.init_decoder:
        init_location = resolve_model_location(args.init_decoder)
        check_weight_files(init_location)
        start = AutoencoderTiny.from_pretrained(init_location, torch_dtype=torch.float32, use_safetensors=True)
        tiny.decoder.load_state_dict(start.decoder.state_dict())  # raises if the architecture differs
    tiny.encoder.requires_grad_(False)
    generated = (
        GeneratedLatents(args.generated_latents_from, accelerator.device, args.seed + accelerator.process_index)
        if args.generated_latents_from
        else None
    )
    decoder = tiny.decoder
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.learning_rate)
    dataset = load_images(args)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=PixelCollator(resolution),
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        # Its own generator: without one, each new iterator (a resume's too) draws from the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )
    decoder, optimizer, dataloader = accelerator.prepare(decoder, optimizer, dataloader)

    global_step = resume_or_seed(accelerator, args, "train_tiny_decoder")
    batches = resumed_batches(accelerator, dataloader, global_step * args.gradient_accumulation_steps)
    generator = torch.Generator(accelerator.device)  # seeded at each batch from this process's checkpointed RNG
    fixed_pixels = PixelCollator(resolution)([load_images(args, "eval", 8)[i] for i in range(8)]).to(
        accelerator.device
    )

    progress = progress_bar(accelerator, args.max_train_steps, global_step)
    samples = []  # for the step journal: each image identifies its row
    for batches_seen, pixels in enumerate(batches, start=global_step * args.gradient_accumulation_steps):
        if global_step >= args.max_train_steps:
            break
        samples.append(fingerprints(pixels))
        # From the global RNG, which a checkpoint restores: a resumed run draws the noise an uninterrupted one would.
        generator.manual_seed(int(torch.randint(2**62, ())))
        with accelerator.accumulate(decoder):
            if generated is not None:
                num_generated = round(len(pixels) * args.generated_fraction)
                latents, target = teacher_latents_and_images(
                    vae, pixels[num_generated:], args.latent_noise_std, generator
                )
                own = generated.sample(num_generated, generator, batches_seen)
                with torch.no_grad():
                    own_target = vae.decode(own / vae.config.scaling_factor).sample.clamp(-1, 1)
                latents, target = torch.cat([own, latents]), torch.cat([own_target, target])
            else:
                latents, target = teacher_latents_and_images(vae, pixels, args.latent_noise_std, generator)
            with accelerator.autocast():
                prediction = decoder(latents)
            loss = reconstruction_loss(
                prediction.float(), target, args.loss, args.edge_loss_weight, args.level_loss_weight
            )
            optimizer_step(accelerator, loss, decoder.parameters(), optimizer)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = mean_over_processes(accelerator, loss=loss)  # the global batch's, not process 0's
        if end_step(accelerator, args, progress, global_step, logs, samples=samples):
            with torch.no_grad():
                latents, full = teacher_latents_and_images(vae, fixed_pixels, 0.0)
                fast = accelerator.unwrap_model(decoder)(latents)
            save_image_grid(to_pil(torch.cat([full, fast])), output_dir / "validation" / f"step-{global_step}.png", 8)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tiny.decoder = accelerator.unwrap_model(decoder)
        finish(args, vae, tiny.eval(), resolution)
    accelerator.end_training()


def describe_loss(args: argparse.Namespace) -> str:
    """The loss and the batch's make-up as the model card states them."""
    terms = [args.loss]
    if args.edge_loss_weight:
        terms.append(f"{args.edge_loss_weight:g} x edge L1 (pixel differences)")
    if args.level_loss_weight:
        terms.append(f"{args.level_loss_weight:g} x level L1 (per-image channel means)")
    text = " + ".join(terms)
    if args.generated_latents_from:
        models = ", ".join(f"`{name}`" for name in args.generated_latents_from)
        text += f"; {args.generated_fraction:.0%} of each batch: latents generated by {models} (their default sampler)"
    return text


def finish(args: argparse.Namespace, vae: AutoencoderKL, tiny: AutoencoderTiny, resolution: int) -> None:
    """Measure the held-out error, save the model (and its card) and push it if asked."""
    output_dir = Path(args.output_dir)
    device = next(vae.parameters()).device
    tiny.to(device)
    eval_set = load_images(args, "eval", args.num_eval_samples)
    pixels = PixelCollator(resolution)([eval_set[i] for i in range(len(eval_set))]).to(device)
    error = decoder_error(vae, tiny, pixels)
    (output_dir / "decoder_error.json").write_text(json.dumps({"n": len(eval_set), **error}, indent=2))
    print(json.dumps(error))
    tiny.to("cpu", torch.float16 if args.save_dtype == "fp16" else torch.float32).save_pretrained(str(output_dir))
    commands = (output_dir / "training_commands.txt").read_text().strip()
    source = args.dataset_name or args.train_data_dir
    save_model_card(
        output_dir,
        template="tiny_decoder",
        fields={
            "model": args.pretrained_model_name_or_path,
            "data": source,
            "decoder_parameters": f"{sum(p.numel() for p in tiny.decoder.parameters()):,}",
            "full_parameters": f"{sum(p.numel() for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]):,}",
            "steps": str(args.max_train_steps)
            + (f" (starting from `{args.init_decoder}`'s decoder)" if args.init_decoder else ""),
            "batch_size": str(args.train_batch_size),
            "loss": describe_loss(args),
            "latent_noise_std": str(args.latent_noise_std),
            "n": str(len(eval_set)),
            "mae": f"{error['tiny_vs_full_mae']:.2f}",
            "rmse": f"{error['tiny_vs_full_rmse']:.2f}",
            "full_mae": f"{error['full_vs_image_mae']:.2f}",
            "command": commands,
        },
        tags=["autoencoder", "tiny-autoencoder", "taesd"],
        base_model=hub_base_model(args.pretrained_model_name_or_path),
    )
    if args.push_to_hub:
        push_to_hub_or_exit(args)


if __name__ == "__main__":
    main()
