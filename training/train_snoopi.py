#!/usr/bin/env python
"""Distil an SD-family teacher into a one-step student with SNOOPI's PG-SB (SwiftBrush VSD with random guidance).

Prompts only, no images. Every step:
  1. student turn: the student maps noise at `--student_timestep` to x0 in one UNet call; x0 is noised to a random
     t in [0.02 T, 0.981 T), and the frozen teacher and the fake score (the teacher plus a LoRA) each give a
     classifier-free-guided noise prediction with the same per-sample scale kappa ~ U(--guidance_scale_min,
     --guidance_scale_max); the student descends the VSD loss with gradient (1 - a_t)(eps_teacher - eps_fake)
     (or DMD2's normalised x0 difference, `--vsd_weighting dmd2`);
  2. fake-score turn(s): the LoRA learns to denoise the student's (detached) samples, 10% of them unconditioned
     so its own guidance has an unconditional branch.

The teacher and the fake score are one UNet: the fake score is a peft LoRA adapter on the frozen teacher weights,
and the teacher is that UNet with the adapter disabled, so the base weights are held once (in the mixed-precision
dtype) and only the LoRA trains. The student is a separate UNet initialised from the teacher (full weights, or a
frozen copy plus a LoRA with `--use_lora`): at SD1.5 size a third base copy costs 1.7 GB in bf16, but keeps the
student's graph, DDP wrapper and gradient checkpointing apart from the adapter switching. See docs/snoopi.md.

    accelerate launch training/train_snoopi.py --pretrained_model_name_or_path shapes-teacher \\
        --output_dir runs/shapes-snoopi --max_train_steps 3000 --resume_from_checkpoint latest

The output folder is a `OneStepPipeline` (`FastPipeline.from_pretrained(output_dir)`); with `--use_lora` it also
holds the student LoRA as `pytorch_lora_weights.safetensors` for `load_lora_weights` on the teacher's components.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from fastgen_diffusers.attention import negative_attention
from fastgen_diffusers.pipelines.auto import read_model_index, resolve_model_location, write_fastgen_metadata
from fastgen_diffusers.pipelines.negative_prompts import DEFAULT_NASA_SCALE
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.shapes import build_dataset, evaluation_prompts
from fastgen_diffusers.shapes.captions import COLOURS
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.checkpointing import checkpoint_step, resolve_resume_path, save_checkpoint
from fastgen_diffusers.training.data import tokenize
from fastgen_diffusers.training.hub import push_folder_to_hub, save_model_card
from fastgen_diffusers.training.run import constant_lr_scheduler, resumed_batches, start_run
from fastgen_diffusers.training.score_distillation import (
    classifier_free_guidance,
    dmd_gradient,
    fake_score_loss,
    noisy_sample,
    one_step_prediction,
    predicted_noise,
    sample_guidance_scales,
    sample_timesteps,
    vsd_gradient,
    vsd_loss,
)
from fastgen_diffusers.training.students import student_lora_config
from fastgen_diffusers.training.validation import save_image_grid

logger = get_logger(__name__, log_level="INFO")

TEACHER_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    group = parser.add_argument_group("models")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="The teacher: an SD-family pipeline folder, Hub id, or embedded model name such as `shapes-teacher`.",
    )
    group.add_argument("--revision", type=str, default=None, help="Hub revision of the teacher.")
    group.add_argument("--variant", type=str, default=None, help="Weight variant of the teacher, e.g. `fp16`.")
    group.add_argument(
        "--student_timestep",
        type=int,
        default=None,
        help="The timestep at which the student reads pure noise (default: the last one, T - 1 = 999 for SD).",
    )
    group.add_argument("--use_lora", action="store_true", help="Train a LoRA on a frozen copy of the teacher.")
    group.add_argument("--lora_rank", type=int, default=64, help="Rank of the student LoRA.")
    group.add_argument("--lora_alpha", type=float, default=64, help="Scaling numerator of the student LoRA.")
    group.add_argument("--fake_lora_rank", type=int, default=64, help="Rank of the fake-score LoRA (SNOOPI: 64).")
    group.add_argument(
        "--fake_lora_alpha", type=float, default=128, help="Scaling numerator of the fake-score LoRA (SNOOPI: 128)."
    )
    group.add_argument(
        "--fake_lora_target_modules",
        type=str,
        nargs="+",
        default=["to_q", "to_v"],
        help="Attention projections the fake-score LoRA adapts (SwiftBrush: to_q to_v).",
    )
    group.add_argument(
        "--nasa_scale",
        type=float,
        default=DEFAULT_NASA_SCALE,
        help="The student's default NASA scale for negative prompts, stored in the output pipeline's config.",
    )

    group = parser.add_argument_group("prompts (ShapesWorld captions unless one of the first two is given)")
    group.add_argument("--prompts_file", type=str, default=None, help="A text file with one prompt per line.")
    group.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset (Hub id or folder).")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--caption_column", type=str, default="text", help="The prompt column of `--dataset_name`.")
    group.add_argument("--num_train_prompts", type=int, default=50_000, help="ShapesWorld captions to draw.")
    group.add_argument(
        "--partial_caption_prob", type=float, default=0.3, help="Share of ShapesWorld captions that omit attributes."
    )
    group.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="Prompts of the validation grids (default: ShapesWorld evaluation prompts, else the first prompts).",
    )

    group = parser.add_argument_group("score distillation")
    group.add_argument(
        "--guidance_scale_min", type=float, default=0.5, help="Lower end of kappa ~ U(min, max) (SNOOPI SD1.5: 0.5)."
    )
    group.add_argument(
        "--guidance_scale_max",
        type=float,
        default=4.0,
        help="Upper end of kappa (SNOOPI SD1.5: 4). Equal to the minimum: fixed-scale VSD (SwiftBrush, 4.5).",
    )
    group.add_argument(
        "--vsd_weighting",
        type=str,
        default="swiftbrush",
        choices=["swiftbrush", "dmd2"],
        help="swiftbrush: (1 - a_t)(eps_teacher - eps_fake) (SNOOPI); dmd2: the x0 difference normalised per sample.",
    )
    group.add_argument("--min_timestep_ratio", type=float, default=0.02, help="VSD timesteps from this share of T.")
    group.add_argument("--max_timestep_ratio", type=float, default=0.981, help="VSD timesteps below this share of T.")
    group.add_argument(
        "--fake_updates_per_step",
        type=int,
        default=1,
        help="Fake-score updates per student update (SwiftBrush 1; DMD2's two time-scale rule uses 5-10).",
    )
    group.add_argument(
        "--fake_prompt_dropout", type=float, default=0.1, help="Share of unconditioned fake-score training samples."
    )

    group = parser.add_argument_group("NASA-T: negative prompts in distillation (SNOOPI v3, section 5.3)")
    group.add_argument(
        "--nasa_training_prob",
        type=float,
        default=0.0,
        help="Share of steps on which the student runs with NASA on a negative prompt, at alpha ~ U(0, max), and the"
        " frozen teacher's CFG uses the negative prompt as its unconditional branch (0: plain PG-SB).",
    )
    group.add_argument("--nasa_training_max_scale", type=float, default=1.0, help="Upper end of NASA-T's alpha.")
    group.add_argument(
        "--negative_prompts_file",
        type=str,
        default=None,
        help="NASA-T negative prompts, one per line, drawn at random (default: a ShapesWorld colour the prompt"
        " does not name).",
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-6, help="Student learning rate (SNOOPI: 1e-6).")
    group.add_argument("--fake_learning_rate", type=float, default=1e-3, help="Fake-score LoRA learning rate.")
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up of both learning rates.")
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--ema_decay", type=float, default=0.9999, help="EMA of the student; the EMA is what is saved.")
    args = parser.parse_args(argv)
    check_common_training_args(args)
    check_snoopi_args(args)
    return args


def check_snoopi_args(args: argparse.Namespace) -> None:
    """Reject values no run could use, naming the flag."""
    if args.prompts_file is not None and args.dataset_name is not None:
        raise ValueError("Give at most one of `--prompts_file` and `--dataset_name`.")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise ValueError(f"`--prompts_file` {args.prompts_file!r} is not a file.")
    if not 0 <= args.guidance_scale_min <= args.guidance_scale_max:
        raise ValueError(
            f"Need 0 <= `--guidance_scale_min` <= `--guidance_scale_max`, got {args.guidance_scale_min} and"
            f" {args.guidance_scale_max}."
        )
    if not 0 <= args.min_timestep_ratio < args.max_timestep_ratio <= 1:
        raise ValueError(
            f"Need 0 <= `--min_timestep_ratio` < `--max_timestep_ratio` <= 1, got {args.min_timestep_ratio} and"
            f" {args.max_timestep_ratio}."
        )
    for name in ("learning_rate", "fake_learning_rate", "lora_rank", "fake_lora_rank", "lora_alpha", "fake_lora_alpha",
                 "num_train_prompts", "fake_updates_per_step"):  # fmt: skip
        if getattr(args, name) <= 0:
            raise ValueError(f"`--{name}` must be positive, got {getattr(args, name)}.")
    if args.negative_prompts_file is not None and not Path(args.negative_prompts_file).is_file():
        raise ValueError(f"`--negative_prompts_file` {args.negative_prompts_file!r} is not a file.")
    if args.nasa_training_max_scale < 0:
        raise ValueError(f"`--nasa_training_max_scale` must be >= 0, got {args.nasa_training_max_scale}.")
    for name in ("partial_caption_prob", "fake_prompt_dropout", "ema_decay", "nasa_training_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"`--{name}` must lie in [0, 1], got {getattr(args, name)}.")
    if args.nasa_scale < 0:
        raise ValueError(f"`--nasa_scale` must be >= 0, got {args.nasa_scale}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"`--lr_warmup_steps` must be >= 0, got {args.lr_warmup_steps}.")
    if args.gradient_accumulation_steps > 1 and args.fake_updates_per_step > 1:
        raise ValueError(
            "`--gradient_accumulation_steps` > 1 needs `--fake_updates_per_step 1`: accumulated fake-score turns would"
            " sum into one update."
        )


def load_prompts(args: argparse.Namespace) -> list[str]:
    """The training prompts: `--prompts_file`, the `--caption_column` of `--dataset_name`, or ShapesWorld captions.

    Only the caption column is read, so datasets with images (and ShapesWorld, whose images are drawn on access)
    never decode one.
    """
    if args.prompts_file is not None:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"`--prompts_file` {args.prompts_file!r} has no prompts.")
        return prompts
    if args.dataset_name is not None:
        import datasets

        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
        if args.caption_column not in dataset.column_names:
            raise ValueError(
                f"`--caption_column` {args.caption_column!r} is not a column of `--dataset_name` {args.dataset_name!r};"
                f" its columns are {dataset.column_names}."
            )
        return [str(caption) for caption in dataset.select_columns([args.caption_column])[args.caption_column]]
    dataset = build_dataset(
        args.num_train_prompts, seed=args.seed, split="train", partial_caption_prob=args.partial_caption_prob
    )
    return list(dataset.with_format(None)["caption"])  # the plain column: no image transform runs


def collate_prompts(prompts: list[str], tokenizer: CLIPTokenizer) -> dict[str, torch.Tensor | list[str]]:
    return {"input_ids": tokenize(tokenizer, prompts), "prompts": prompts}


def load_negative_prompts(args: argparse.Namespace) -> list[str] | None:
    """NASA-T's negative prompts from `--negative_prompts_file`; None means ShapesWorld colours (see below)."""
    if args.negative_prompts_file is None:
        return None
    negatives = [line.strip() for line in Path(args.negative_prompts_file).read_text().splitlines() if line.strip()]
    if not negatives:
        raise ValueError(f"`--negative_prompts_file` {args.negative_prompts_file!r} has no prompts.")
    return negatives


def draw_negative_prompts(prompts: list[str], negatives: list[str] | None) -> list[str]:
    """One negative prompt per prompt: a random line of `negatives`, or else a ShapesWorld colour the prompt does
    not name (a negative that contradicts the prompt teaches nothing)."""
    if negatives is not None:
        return [negatives[i] for i in torch.randint(len(negatives), (len(prompts),)).tolist()]
    drawn = []
    for prompt in prompts:
        absent = [colour for colour in COLOURS if f" {colour} " not in f" {prompt} "]
        drawn.append(absent[torch.randint(len(absent), ()).item()])
    return drawn


def check_teacher(location: str, args: argparse.Namespace) -> None:
    index = read_model_index(location, revision=args.revision)
    missing = [name for name in TEACHER_COMPONENTS if not (index.get(name) or [None])[0]]
    if missing:
        raise ValueError(
            f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} must be an SD-family pipeline"
            f" with {list(TEACHER_COMPONENTS)}; it lacks {missing}."
        )


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters an optimiser updates, by name: what a checkpoint must hold besides the optimiser state."""
    return {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}


@contextlib.contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The frozen teacher: the fake-score UNet with its LoRA switched off, back on when the block ends."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def guided_noise(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    unconditional_embeds: torch.Tensor,
    guidance_scale: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Classifier-free-guided epsilon with per-sample scales, from one UNet call on the doubled batch (float32).

    `unconditional_embeds` are the null prompt's, or a negative prompt's (NASA-T's teacher)."""
    model_output = unet(
        torch.cat([sample, sample]),
        torch.cat([timesteps, timesteps]),
        torch.cat([unconditional_embeds, prompt_embeds]),
    ).sample
    unconditional, conditional = model_output.chunk(2)
    guided = classifier_free_guidance(unconditional, conditional, guidance_scale)
    alpha_prod_t = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    return predicted_noise(guided, sample, alpha_prod_t, prediction_type)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = start_run(args)

    # Frozen pieces in the mixed-precision dtype; trainable weights (student, LoRAs) stay in float32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    location = resolve_model_location(args.pretrained_model_name_or_path)
    check_teacher(location, args)
    load = {"revision": args.revision, "variant": args.variant}
    tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=weight_dtype, **load)
    vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **load)  # float32: decodes validation images only
    noise_scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", revision=args.revision)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.prediction_type
    student_timestep = num_train_timesteps - 1 if args.student_timestep is None else args.student_timestep
    if not 0 <= student_timestep < num_train_timesteps:
        raise ValueError(f"`--student_timestep` must lie in [0, {num_train_timesteps}), got {student_timestep}.")

    # Teacher and fake score: one UNet, the fake score being a LoRA on the frozen teacher weights.
    fake_unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=weight_dtype, **load)
    fake_unet.requires_grad_(False).to(accelerator.device)
    fake_unet.add_adapter(
        LoraConfig(
            r=args.fake_lora_rank,
            lora_alpha=args.fake_lora_alpha,
            init_lora_weights="gaussian",
            target_modules=args.fake_lora_target_modules,
        )
    )
    student_dtype = weight_dtype if args.use_lora else torch.float32
    student = UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=student_dtype, **load)
    if args.use_lora:
        student.requires_grad_(False)
        student.add_adapter(student_lora_config(args.lora_rank, args.lora_alpha))
    student.to(accelerator.device)
    cast_training_params([fake_unet, student], dtype=torch.float32)
    text_encoder.requires_grad_(False).to(accelerator.device)
    vae.requires_grad_(False).to(accelerator.device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        fake_unet.enable_gradient_checkpointing()
    student_params, fake_params = trainable_parameters(student), trainable_parameters(fake_unet)

    # Checkpoints hold the trainable weights only (not the frozen teacher), in float32, exactly.
    checkpointed = {"student": student_params, "fake_score": fake_params}

    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            for name, params in checkpointed.items():
                state = {key: value.detach().float().cpu().contiguous() for key, value in params.items()}
                save_file(state, str(Path(checkpoint_dir) / f"{name}.safetensors"))
        weights.clear()  # nothing left for accelerate to save

    def load_model_hook(models, checkpoint_dir):
        for name, params in checkpointed.items():
            state = load_file(str(Path(checkpoint_dir) / f"{name}.safetensors"))
            if state.keys() != params.keys():
                raise ValueError(f"{checkpoint_dir}/{name}.safetensors does not match this run's trainable weights.")
            with torch.no_grad():
                for key, value in params.items():
                    value.copy_(state[key])
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # AdamW without weight decay: SwiftBrush's Adam, named as the papers do.
    student_optimizer = torch.optim.AdamW(student_params.values(), lr=args.learning_rate, weight_decay=0.0)
    fake_optimizer = torch.optim.AdamW(fake_params.values(), lr=args.fake_learning_rate, weight_decay=0.0)
    student_lr_scheduler = constant_lr_scheduler(
        student_optimizer, accelerator, args.lr_warmup_steps, args.max_train_steps
    )
    fake_lr_scheduler = constant_lr_scheduler(
        fake_optimizer,
        accelerator,
        args.lr_warmup_steps * args.fake_updates_per_step,
        args.max_train_steps * args.fake_updates_per_step,
    )

    prompts = load_prompts(args)
    if len(prompts) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"{len(prompts)} prompts make no full batch of `--train_batch_size` {args.train_batch_size} on"
            f" {accelerator.num_processes} processes."
        )
    dataloader = DataLoader(
        prompts,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=functools.partial(collate_prompts, tokenizer=tokenizer),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    (student, fake_unet, student_optimizer, fake_optimizer, student_lr_scheduler, fake_lr_scheduler, dataloader) = (
        accelerator.prepare(
            student, fake_unet, student_optimizer, fake_optimizer, student_lr_scheduler, fake_lr_scheduler, dataloader
        )
    )
    raw_student, raw_fake_unet = accelerator.unwrap_model(student), accelerator.unwrap_model(fake_unet)
    ema = EMAModel(list(student_params.values()), decay=args.ema_decay)  # after `prepare` synced the processes
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    global_step = 0
    resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))  # also each process's random state
        global_step = checkpoint_step(resume_path)
    else:
        set_seed(args.seed, device_specific=True)  # each process draws its own noise, timesteps and scales
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_snoopi", config=config)

    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device, dtype=torch.float32)
    with torch.no_grad():
        null_embeds = text_encoder(tokenize(tokenizer, [""]).to(accelerator.device), return_dict=False)[0]
    latent_shape = (raw_student.config.in_channels, raw_student.config.sample_size, raw_student.config.sample_size)
    if args.validation_prompts is not None:
        validation_prompts = args.validation_prompts
    elif args.prompts_file is None and args.dataset_name is None:
        validation_prompts = [p.caption for p in evaluation_prompts(args.num_validation_images, seed=args.seed)]
    else:
        validation_prompts = prompts[: args.num_validation_images]

    def generate(
        prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None = None, nasa_scale: float = 0.0
    ) -> torch.Tensor:
        """The student's x0 (float32) for fresh noise: one UNet call at the student timestep, steered away from
        `negative_embeds` by NASA when they are given (NASA-T)."""
        noise = torch.randn(prompt_embeds.shape[0], *latent_shape, device=accelerator.device)
        timesteps = torch.full((noise.shape[0],), student_timestep, device=accelerator.device)
        steering = (
            negative_attention(raw_student, negative_embeds, nasa_scale)
            if negative_embeds is not None
            else contextlib.nullcontext()
        )
        with steering:
            model_output = student(noise, timesteps, prompt_embeds).sample
        return one_step_prediction(model_output, noise, alphas_cumprod, student_timestep, prediction_type)

    def fake_score_step(original_sample: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One update of the fake-score LoRA on detached student samples, with prompt dropout."""
        batch_size = original_sample.shape[0]
        timesteps = sample_timesteps(batch_size, num_train_timesteps, device=accelerator.device)
        noise = torch.randn_like(original_sample)
        sample = noisy_sample(original_sample.detach(), noise, alphas_cumprod, timesteps)
        dropped = torch.rand(batch_size, device=accelerator.device) < args.fake_prompt_dropout
        prompt_embeds = torch.where(dropped[:, None, None], null_embeds.expand_as(prompt_embeds), prompt_embeds)
        model_output = fake_unet(sample, timesteps, prompt_embeds).sample
        loss = fake_score_loss(model_output, noise, sample, alphas_cumprod, timesteps, prediction_type)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(list(fake_params.values()), args.max_grad_norm)
        fake_optimizer.step()
        fake_lr_scheduler.step()
        fake_optimizer.zero_grad()
        return loss

    def validation_pipeline() -> OneStepPipeline:
        pipeline = OneStepPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=raw_student,
            scheduler=noise_scheduler,
            student_timestep=student_timestep,
            default_nasa_scale=args.nasa_scale,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    negative_prompts = load_negative_prompts(args)
    data = resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    while global_step < args.max_train_steps:
        batch = next(data)
        with accelerator.accumulate(student, fake_unet):
            with torch.no_grad():
                prompt_embeds = text_encoder(batch["input_ids"], return_dict=False)[0]
            batch_null_embeds = null_embeds.expand_as(prompt_embeds)
            batch_size = prompt_embeds.shape[0]

            # 1. Student turn: VSD with the same per-sample guidance scale in both teachers. On a NASA-T step the
            # student steers away from a negative prompt and the frozen teacher's CFG pushes away from the same
            # prompt; the fake score keeps the null prompt (SNOOPI v3: negatives there too did worse).
            teacher_unconditional = batch_null_embeds
            if args.nasa_training_prob > 0 and torch.rand(()).item() < args.nasa_training_prob:
                negatives = draw_negative_prompts(batch["prompts"], negative_prompts)
                with torch.no_grad():
                    teacher_unconditional = text_encoder(
                        tokenize(tokenizer, negatives).to(accelerator.device), return_dict=False
                    )[0]
                nasa_scale = args.nasa_training_max_scale * torch.rand(()).item()
                original_sample = generate(prompt_embeds, teacher_unconditional, nasa_scale)
            else:
                original_sample = generate(prompt_embeds)
            guidance_scale = sample_guidance_scales(
                batch_size, args.guidance_scale_min, args.guidance_scale_max, device=accelerator.device
            )
            timesteps = sample_timesteps(
                batch_size, num_train_timesteps, args.min_timestep_ratio, args.max_timestep_ratio, accelerator.device
            )
            sample = noisy_sample(
                original_sample.detach(), torch.randn_like(original_sample), alphas_cumprod, timesteps
            )
            with torch.no_grad():
                with adapters_disabled(raw_fake_unet) as teacher:
                    teacher_noise = guided_noise(
                        teacher, sample, timesteps, prompt_embeds, teacher_unconditional, guidance_scale,
                        alphas_cumprod, prediction_type,
                    )  # fmt: skip
                fake_noise = guided_noise(
                    raw_fake_unet, sample, timesteps, prompt_embeds, batch_null_embeds, guidance_scale,
                    alphas_cumprod, prediction_type,
                )  # fmt: skip
            if args.vsd_weighting == "swiftbrush":
                gradient = vsd_gradient(teacher_noise, fake_noise, alphas_cumprod, timesteps)
            else:
                gradient = dmd_gradient(teacher_noise, fake_noise, original_sample, sample, alphas_cumprod, timesteps)
            student_loss = vsd_loss(original_sample, gradient)
            accelerator.backward(student_loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(list(student_params.values()), args.max_grad_norm)
            student_optimizer.step()
            student_lr_scheduler.step()
            student_optimizer.zero_grad()

            # 2. Fake-score turn(s): the first on this step's samples, further ones on fresh noise.
            fake_loss = fake_score_step(original_sample, prompt_embeds)
            for _ in range(args.fake_updates_per_step - 1):
                with torch.no_grad():
                    fresh_sample = generate(prompt_embeds)
                fake_loss = fake_score_step(fresh_sample, prompt_embeds)

        if not accelerator.sync_gradients:
            continue
        ema.step(list(student_params.values()))
        global_step += 1
        progress.update(1)
        losses = accelerator.gather(torch.stack([student_loss.detach(), fake_loss.detach()]).reshape(1, 2)).mean(0)
        logs = {
            "vsd_loss": losses[0].item(),
            "fake_score_loss": losses[1].item(),
            "kappa": guidance_scale.mean().item(),
        }
        progress.set_postfix(**logs)
        accelerator.log(logs, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        if accelerator.is_main_process and global_step % args.validation_steps == 0:
            ema.store(student_params.values())
            ema.copy_to(student_params.values())
            generator = [torch.Generator().manual_seed(args.seed + i) for i in range(len(validation_prompts))]
            with accelerator.autocast():
                images = validation_pipeline()(validation_prompts, generator=generator).images
            save_image_grid(images, output_dir / "validation" / f"step-{global_step}.png")
            ema.restore(student_params.values())

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.copy_to(student_params.values())
        config = {"student_timestep": student_timestep, "default_nasa_scale": args.nasa_scale}
        if args.use_lora:
            # The LoRA in Diffusers' format, then the student merged into the teacher's float32 weights.
            OneStepPipeline.save_lora_weights(
                output_dir,
                unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(raw_student)),
                unet_lora_adapter_metadata=raw_student.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
            pipeline = OneStepPipeline.from_pretrained(location, **load, **config)
            pipeline.load_lora_weights(output_dir)
            pipeline.fuse_lora()
            pipeline.unload_lora_weights()
        else:
            pipeline = OneStepPipeline.from_pretrained(location, unet=raw_student, **load, **config)
        pipeline.save_pretrained(str(output_dir))
        write_fastgen_metadata(
            output_dir,
            {
                "method": "snoopi",
                "default_inference": {
                    "timesteps": [student_timestep],
                    "guidance_scale": 1.0,
                    "nasa_scale": args.nasa_scale,
                },
            },
        )
        save_model_card(
            output_dir,
            template="snoopi",
            fields={
                "teacher": args.pretrained_model_name_or_path,
                "command": (output_dir / "training_commands.txt").read_text().strip(),
                "steps": str(args.max_train_steps),
                "guidance": (
                    f"kappa ~ U({args.guidance_scale_min:g}, {args.guidance_scale_max:g}) per sample (PG-SB)"
                    if args.guidance_scale_min < args.guidance_scale_max
                    else f"fixed kappa = {args.guidance_scale_min:g} (SwiftBrush's fixed-scale VSD)"
                ),
                "weighting": (
                    "SwiftBrush's (1 - a_t)(eps_teacher - eps_fake)"
                    if args.vsd_weighting == "swiftbrush"
                    else "DMD2's (x0_fake - x0_teacher) / mean|x0 - x0_teacher|"
                ),
                "student": (
                    f"LoRA (rank {args.lora_rank}), also saved as `pytorch_lora_weights.safetensors` for"
                    " `load_lora_weights` on a `OneStepPipeline` of the teacher's components"
                    if args.use_lora
                    else "full fine-tuning"
                ),
                "nasa_training": (
                    f"NASA-T on {100 * args.nasa_training_prob:g}% of steps: NASA alpha ~ U(0,"
                    f" {args.nasa_training_max_scale:g}) on "
                    + (
                        "`" + args.negative_prompts_file + "` prompts"
                        if args.negative_prompts_file
                        else "a ShapesWorld colour the prompt does not name"
                    )
                    + ", the frozen teacher's CFG away from the same negative prompt"
                    if args.nasa_training_prob > 0
                    else "none (NASA is training-free at inference)"
                ),
                "student_timestep": str(student_timestep),
                "nasa_scale": f"{args.nasa_scale:g}",
                "example_prompt": json.dumps(validation_prompts[0]),
            },
            tags=["text-to-image", "one-step", "snoopi", "score-distillation"] + (["lora"] if args.use_lora else []),
            base_model=None if Path(location).exists() else location,  # a Hub id, not a local folder
        )
        if args.push_to_hub:
            push_folder_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
    accelerator.end_training()


if __name__ == "__main__":
    main()
