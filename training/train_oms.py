#!/usr/bin/env python
"""Train a One More Step (OMS) module for the latent space of an SD-family pipeline.

OMS's network reads unit-variance noise x_S and a caption and predicts v at zero SNR, which is minus the clean
latent. So training is plain regression: encode an image with the base pipeline's VAE (scaled as its diffusion
model sees it), draw x_S independently, and regress the network's output onto -x0. Captions are dropped to ""
with `--caption_dropout_prob`, so the module has an unconditional branch for its own classifier-free guidance.
The base UNet is not needed: only its VAE (the latent space) and its text encoder (which the module reads and,
by default, reuses at inference instead of storing a copy).

    accelerate launch training/train_oms.py --pretrained_model_name_or_path shapes-teacher \\
        --output_dir runs/shapes-oms --max_train_steps 3000 --resume_from_checkpoint latest

Data: ShapesWorld (`--dataset_name shapesworld`, the default) or any image-text `datasets` dataset: a Hub id or a
local folder for `load_dataset` (`--dataset_name`), or an image folder with `metadata.jsonl` (`--train_data_dir`).
The output folder is an `OMSPipeline` without a base: `OMSPipeline.from_pretrained(output_dir, base_pipeline=pipe)`
or `FastPipeline.from_pretrained(base, oms=output_dir)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader
from transformers import CLIPTextModel, CLIPTokenizer

from fastgen_diffusers.models.oms import OMSModel, predicted_original_sample
from fastgen_diffusers.pipelines.auto import resolve_model_location, write_fastgen_metadata
from fastgen_diffusers.pipelines.oms import OMSPipeline
from fastgen_diffusers.shapes import build_dataset, evaluation_prompts
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.data import images_to_tensor, tokenize
from fastgen_diffusers.training.hub import push_to_hub_or_exit, save_model_card
from fastgen_diffusers.training import run
from fastgen_diffusers.training.validation import save_image_grid
from fastgen_diffusers.utils.safe_loading import check_weight_files

logger = get_logger(__name__, log_level="INFO")

SHAPESWORLD = "shapesworld"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    group = parser.add_argument_group("base pipeline (its VAE and text encoder)")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="The SD-family pipeline whose latent space the module serves (a folder, Hub id or embedded model).",
    )
    group.add_argument("--revision", type=str, default=None)
    group.add_argument(
        "--save_text_encoder",
        action="store_true",
        help="Store the text encoder and tokenizer in the module's folder, for bases whose own encoder differs"
        " (as the original OMS-B stores SD2.1's for SD1.5). Default: the module reuses its base's.",
    )
    group = parser.add_argument_group("OMS network (a UNet2DConditionModel called at one fixed timestep)")
    group.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 64])
    group.add_argument("--layers_per_block", type=int, default=1)
    group.add_argument("--attention_head_dim", type=int, default=8)
    group.add_argument(
        "--first_attention_level",
        type=int,
        default=1,
        help="Levels below this one have plain ResNet blocks, no attention. The module predicts an image's low"
        " frequencies, and self-attention over every position of the full-resolution level was most of its cost:"
        " 1 (the default) keeps attention and the text at the coarser levels; 0 puts them at every level.",
    )
    group.add_argument("--norm_num_groups", type=int, default=8)
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=SHAPESWORLD,
        help=f"'{SHAPESWORLD}' (drawn on the fly) or a `datasets` Hub id / folder with image and caption columns.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--train_data_dir", type=str, default=None, help="An image folder with metadata.jsonl.")
    group.add_argument("--image_column", type=str, default="image")
    group.add_argument("--caption_column", type=str, default="text", help="ShapesWorld's is always `caption`.")
    group.add_argument("--resolution", type=int, default=None, help="Image size (default: the base VAE's).")
    group.add_argument("--num_train_samples", type=int, default=200_000, help="ShapesWorld rows.")
    group.add_argument("--partial_caption_prob", type=float, default=0.3, help="ShapesWorld captions leaving attributes out.")
    group.add_argument("--caption_dropout_prob", type=float, default=0.1, help="Captions replaced by '' (for CFG).")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-3)
    group.add_argument("--lr_warmup_steps", type=int, default=100)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--ema_decay", type=float, default=0.995, help="EMA of the module; the EMA is what is saved.")
    args = parser.parse_args(argv)
    check_common_training_args(args)
    if not 0.0 <= args.caption_dropout_prob <= 1.0:
        raise ValueError(f"`--caption_dropout_prob` must lie in [0, 1], got {args.caption_dropout_prob}.")
    if not 0.0 <= args.partial_caption_prob <= 1.0:
        raise ValueError(f"`--partial_caption_prob` must lie in [0, 1], got {args.partial_caption_prob}.")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must lie in (0, 1), got {args.ema_decay}.")
    if not 0 <= args.first_attention_level < len(args.block_out_channels):
        raise ValueError(
            f"`--first_attention_level` must lie in [0, {len(args.block_out_channels) - 1}] (one of the"
            f" {len(args.block_out_channels)} levels of `--block_out_channels`), got {args.first_attention_level}."
        )
    if args.train_data_dir is not None and args.dataset_name != SHAPESWORLD:
        raise ValueError("Pass `--dataset_name` or `--train_data_dir`, not both.")
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        raise ValueError(f"`--train_data_dir` {args.train_data_dir!r} is not a folder.")
    return args


def load_image_text_dataset(args: argparse.Namespace) -> tuple[datasets.Dataset, str, str]:
    """The training rows, and the names of their image and caption columns."""
    if args.train_data_dir is not None:
        dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
    elif args.dataset_name == SHAPESWORLD:
        dataset = build_dataset(args.num_train_samples, seed=args.seed, partial_caption_prob=args.partial_caption_prob)
        return dataset, "image", "caption"
    else:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    for column in (args.image_column, args.caption_column):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no column {column!r}; its columns are {dataset.column_names}.")
    return dataset, args.image_column, args.caption_column


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to `size` (what Diffusers' text-to-image scripts do with --center_crop)."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


class OMSCollator:
    """Rows to pixel values and token ids."""

    def __init__(self, tokenizer, image_column: str, caption_column: str, resolution: int):
        self.tokenizer, self.image_column, self.caption_column = tokenizer, image_column, caption_column
        self.resolution = resolution

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        captions = [row[self.caption_column] for row in rows]
        images = [center_crop_resize(row[self.image_column], self.resolution) for row in rows]
        return {"pixel_values": images_to_tensor(images), "input_ids": tokenize(self.tokenizer, captions)}


def drop_captions(input_ids: torch.Tensor, empty_ids: torch.Tensor, dropout: float) -> torch.Tensor:
    """Each caption replaced by the empty one with probability `dropout`.

    Drawn in the training loop from the process's global RNG, which checkpoints restore, not in the collator: the
    data loader collates a batch ahead and skips batches on resume, so a collator's own draws would not resume.
    """
    dropped = torch.rand(input_ids.shape[0], device=input_ids.device) < dropout
    return torch.where(dropped[:, None], empty_ids.to(input_ids.device).expand_as(input_ids), input_ids)


def make_oms_model(args: argparse.Namespace, vae: AutoencoderKL, text_encoder: CLIPTextModel, resolution: int) -> OMSModel:
    """A cross-attention UNet in the base's latent space, reading the base's text embeddings."""
    depth = len(args.block_out_channels)
    plain = args.first_attention_level
    return OMSModel(
        sample_size=resolution // 2 ** (len(vae.config.block_out_channels) - 1),
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (depth - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - plain) + ("UpBlock2D",) * plain,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=args.attention_head_dim,
        norm_num_groups=args.norm_num_groups,
    )


def attention_levels_text(first_attention_level: int, depth: int) -> str:
    """The model card's words for where the module attends."""
    if first_attention_level == 0:
        return "self- and cross-attention at every level"
    return f"self- and cross-attention from level {first_attention_level} of {depth} (plain ResNet blocks above)"


def scaled_latents(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """The latent the base diffusion model sees: a posterior sample, shifted and scaled as in its training."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def oms_loss(model: OMSModel, latents: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """MSE between the network's v on independent unit noise and the zero-SNR target v = -x0."""
    noise = torch.randn_like(latents)
    v = model(noise, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(v.float(), -latents.float())


@torch.no_grad()
def decoded_predictions(model: OMSModel, vae, text_encoder, tokenizer, prompts: list[str], seed: int) -> list[Image.Image]:
    """The module's x0 for `prompts`, decoded: what it hands the base model, before the noise is added."""
    device = next(model.parameters()).device
    embeds = text_encoder(tokenize(tokenizer, prompts).to(device), return_dict=False)[0]
    noise = torch.randn(
        (len(prompts), model.config.in_channels, model.config.sample_size, model.config.sample_size),
        generator=torch.Generator().manual_seed(seed),
    ).to(device)
    latents = predicted_original_sample(model(noise, embeds.to(model.dtype), return_dict=False)[0])
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = run.start_run(args)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    base = resolve_model_location(args.pretrained_model_name_or_path)
    check_weight_files(base)  # safetensors only: a pickle is refused, a damaged file named
    load = {"revision": args.revision, "use_safetensors": True}
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **load)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **load)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=args.revision)
    vae.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    text_encoder.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    resolution = args.resolution or vae.config.sample_size

    model = make_oms_model(args, vae, text_encoder, resolution)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = EMAModel(model.parameters(), decay=args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = run.constant_lr_scheduler(optimizer, accelerator, args.lr_warmup_steps, args.max_train_steps)

    dataset, image_column, caption_column = load_image_text_dataset(args)
    empty_ids = tokenize(tokenizer, [""])
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=OMSCollator(tokenizer, image_column, caption_column, resolution),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, lr_scheduler, dataloader = accelerator.prepare(model, optimizer, lr_scheduler, dataloader)
    ema.to(accelerator.device)

    # Each process its own x_S, posterior samples and caption dropout; a resumed run gets its RNG states back.
    global_step = run.resume_or_seed(accelerator, args, "train_oms")
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        logger.info(f"OMS network: {sum(p.numel() for p in raw.parameters()):,} parameters")
    validation_prompts = [p.caption for p in evaluation_prompts(args.num_validation_images, seed=args.seed)]

    data = run.resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    progress = run.progress_bar(accelerator, args.max_train_steps, global_step)
    samples = []  # for the step journal: each image identifies its row
    while global_step < args.max_train_steps:
        batch = next(data)
        samples.append(run.fingerprints(batch["pixel_values"]))
        with accelerator.accumulate(model):
            input_ids = drop_captions(batch["input_ids"], empty_ids, args.caption_dropout_prob)
            with torch.no_grad():
                latents = scaled_latents(vae, batch["pixel_values"])
                encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            loss = oms_loss(model, latents, encoder_hidden_states)
            run.optimizer_step(accelerator, loss, model.parameters(), optimizer, lr_scheduler, args.max_grad_norm)
        if not accelerator.sync_gradients:
            continue
        ema.step(model.parameters())
        global_step += 1
        logs = run.mean_over_processes(accelerator, loss=loss)
        if run.end_step(accelerator, args, progress, global_step, logs, samples=samples):
            with run.ema_weights(ema, model.parameters()):
                images = decoded_predictions(
                    accelerator.unwrap_model(model), vae, text_encoder, tokenizer, validation_prompts, args.seed
                )
            save_image_grid(images, output_dir / "validation" / f"step-{global_step}.png")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model).to(torch.float32)
        ema.copy_to(raw.parameters())
        pipe = OMSPipeline(
            oms_model=raw,
            oms_text_encoder=text_encoder.to(torch.float32) if args.save_text_encoder else None,
            oms_tokenizer=tokenizer if args.save_text_encoder else None,
            latent_channels=vae.config.latent_channels,
            vae_scaling_factor=vae.config.scaling_factor,
        )
        pipe.save_pretrained(str(output_dir))
        write_fastgen_metadata(
            output_dir,
            {"method": "oms", "trained_on": args.pretrained_model_name_or_path},
        )
        save_model_card(
            output_dir,
            template="oms",
            fields={
                "base": args.pretrained_model_name_or_path,
                "parameters": f"{sum(p.numel() for p in raw.parameters()):,}",
                "architecture": f"block_out_channels {tuple(args.block_out_channels)}, "
                f"layers_per_block {args.layers_per_block}, "
                + attention_levels_text(args.first_attention_level, len(args.block_out_channels)),
                "text_encoder": "stored in this folder" if args.save_text_encoder else "the base pipeline's (not stored)",
                "data": args.train_data_dir or args.dataset_name,
                "steps": str(args.max_train_steps),
                "command": (output_dir / "training_commands.txt").read_text().strip(),
            },
            tags=["text-to-image", "stable-diffusion", "one-more-step"],
            base_model=None,
        )
        if args.push_to_hub:
            push_to_hub_or_exit(args)
    accelerator.end_training()


if __name__ == "__main__":
    main()
