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
        --shapesworld_prompts 50000 --output_dir runs/shapes-snoopi --max_train_steps 3000 \\
        --resume_from_checkpoint latest

The output folder is a `OneStepPipeline` (`FastPipeline.from_pretrained(output_dir)`); with `--use_lora` it also
holds the student LoRA as `pytorch_lora_weights.safetensors` for `load_lora_weights` on the teacher's components.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from torch.utils.data import DataLoader
from transformers import CLIPTextModel, CLIPTokenizer

from fastgen_diffusers.attention import negative_attention
from fastgen_diffusers.pipelines.auto import read_model_index, resolve_model_location, write_fastgen_metadata
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.schedulers import OneStepScheduler
from fastgen_diffusers.shapes.captions import COLOURS
from fastgen_diffusers.training import arguments, reflow, run
from fastgen_diffusers.training.checkpointing import checkpoint_trainable_weights, trainable_parameters
from fastgen_diffusers.training.data import tokenize
from fastgen_diffusers.training.hub import publish
from fastgen_diffusers.training.lora import adapters_disabled, save_unet_lora, unet_lora_config
from fastgen_diffusers.training.prompts import (
    add_prompt_args,
    check_prompt_args,
    default_validation_prompts,
    draw_negative_prompts,
    load_prompts,
    read_lines,
)
from fastgen_diffusers.training.score_distillation import (
    dmd_gradient,
    fake_score_loss,
    guided_noise,
    sample_guidance_scales,
    sample_timesteps,
    vsd_gradient,
    vsd_loss,
)
from fastgen_diffusers.training.students import student_scheduler
from fastgen_diffusers.training.validation import save_image_grid
from fastgen_diffusers.utils.safe_loading import check_weight_files

logger = get_logger(__name__, log_level="INFO")

TEACHER_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.training_parser(__doc__)
    group = arguments.add_pretrained_model_arg(
        parser, "The teacher: an SD-family pipeline folder, Hub id, or embedded model name such as `shapes-teacher`."
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
    arguments.add_nasa_scale_arg(group)

    add_prompt_args(parser)
    parser.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="Prompts of the validation grids (default: ShapesWorld's evaluation prompts with"
        " `--shapesworld_prompts`, else the first training prompts).",
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
    group.add_argument(
        "--fake_updates_per_step",
        type=int,
        default=1,
        help="Fake-score updates per student update (SwiftBrush 1; DMD2's two time-scale rule uses 5-10).",
    )
    group.add_argument("--min_timestep_ratio", type=float, default=0.02, help="VSD timesteps from this share of T.")
    group.add_argument("--max_timestep_ratio", type=float, default=0.981, help="VSD timesteps below this share of T.")
    group.add_argument(
        "--fake_prompt_dropout", type=float, default=0.1, help="Share of unconditioned fake-score training samples."
    )

    group = parser.add_argument_group("regression on teacher pairs (DMD): keeps the modes VSD drops")
    group.add_argument(
        "--regression_pairs_dir",
        type=str,
        default=None,
        help="Teacher pairs from generate_reflow_pairs.py (noise, the teacher's latent for it, prompt): the student's"
        " x0 from a pair's noise is pulled toward the teacher's latent, so each noise keeps the teacher's mode.",
    )
    group.add_argument(
        "--regression_weight", type=float, default=0.25, help="lambda of the regression loss (DMD: 0.25)."
    )
    group.add_argument(
        "--regression_loss", type=str, default="l2", choices=("l2", "pseudo_huber"), help="In latent space."
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
        help="NASA-T negative prompts, one per line; each prompt draws one it does not name.",
    )
    group.add_argument(
        "--shapesworld_negative_colours",
        action="store_true",
        help="NASA-T negative prompts: the ShapesWorld colours (instead of `--negative_prompts_file`).",
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-6, help="Student learning rate (SNOOPI: 1e-6).")
    group.add_argument("--fake_learning_rate", type=float, default=1e-3, help="Fake-score LoRA learning rate.")
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up of both learning rates.")
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--ema_decay", type=float, default=0.9999, help="EMA of the student; the EMA is what is saved.")
    args = parser.parse_args(argv)
    arguments.check_common_training_args(args)
    check_prompt_args(args)
    check_snoopi_args(args)
    return args


def check_snoopi_args(args: argparse.Namespace) -> None:
    """Reject values no run could use, naming the flag."""
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
    arguments.check_positive(args, "learning_rate", "fake_learning_rate", "lora_rank", "fake_lora_rank", "lora_alpha",
                   "fake_lora_alpha", "fake_updates_per_step")  # fmt: skip
    arguments.check_non_negative(args, "nasa_training_max_scale", "nasa_scale", "lr_warmup_steps", "regression_weight")
    arguments.check_fraction(args, "fake_prompt_dropout", "ema_decay", "nasa_training_prob")
    if args.regression_pairs_dir is not None and not Path(args.regression_pairs_dir).is_dir():
        raise ValueError(
            f"`--regression_pairs_dir` {args.regression_pairs_dir!r} is not a folder; write teacher pairs with"
            " generate_reflow_pairs.py."
        )
    if args.negative_prompts_file is not None and not Path(args.negative_prompts_file).is_file():
        raise ValueError(f"`--negative_prompts_file` {args.negative_prompts_file!r} is not a file.")
    if args.negative_prompts_file is not None and args.shapesworld_negative_colours:
        raise ValueError("Give at most one of `--negative_prompts_file` and `--shapesworld_negative_colours`.")
    if args.nasa_training_prob > 0 and args.negative_prompts_file is None and not args.shapesworld_negative_colours:
        raise ValueError(
            "`--nasa_training_prob` > 0 needs negative prompts: `--negative_prompts_file` or"
            " `--shapesworld_negative_colours`."
        )
    if args.gradient_accumulation_steps > 1 and args.fake_updates_per_step > 1:
        raise ValueError(
            "`--gradient_accumulation_steps` > 1 needs `--fake_updates_per_step 1`: accumulated fake-score turns would"
            " sum into one update."
        )


def check_teacher(location: str, args: argparse.Namespace) -> None:
    index = read_model_index(location, revision=args.revision)
    missing = [name for name in TEACHER_COMPONENTS if not (index.get(name) or [None])[0]]
    if missing:
        raise ValueError(
            f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} must be an SD-family pipeline"
            f" with {list(TEACHER_COMPONENTS)}; it lacks {missing}."
        )


def collate_prompts(prompts: list[str], tokenizer: CLIPTokenizer) -> dict[str, torch.Tensor | list[str]]:
    return {"input_ids": tokenize(tokenizer, prompts), "prompts": prompts}


def card_fields(args: argparse.Namespace, student_timestep: int, example_prompt: str) -> dict[str, str]:
    """What the `snoopi` model card says about the run."""
    if args.negative_prompts_file is not None:
        negatives = f"`{args.negative_prompts_file}` prompts"
    else:
        negatives = "ShapesWorld colours"
    return {
        "teacher": args.pretrained_model_name_or_path,
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
            f" {args.nasa_training_max_scale:g}) on one of the {negatives} the prompt does not name, the frozen"
            " teacher's CFG away from the same negative prompt"
            if args.nasa_training_prob > 0
            else "none (NASA is training-free at inference)"
        ),
        "student_timestep": str(student_timestep),
        "nasa_scale": f"{args.nasa_scale:g}",
        "example_prompt": json.dumps(example_prompt),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # 1. The run: accelerator, seed, recorded command.
    accelerator = run.start_run(args)
    weight_dtype = run.DTYPES[accelerator.mixed_precision]

    # 2. Models. Frozen pieces in the mixed-precision dtype; trainable weights (student, LoRAs) stay in float32. The
    # student's scheduler (the teacher's schedule, read at `student_timestep`) noises and predicts x0.
    location = resolve_model_location(args.pretrained_model_name_or_path)
    check_teacher(location, args)
    check_weight_files(location)  # safetensors only: a pickle is refused, a damaged file named
    load = {"revision": args.revision, "variant": args.variant, "use_safetensors": True}
    tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=weight_dtype, **load)
    vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **load)  # float32: decodes validation images only
    teacher_scheduler_config = OneStepScheduler.load_config(location, subfolder="scheduler", revision=args.revision)
    noise_scheduler = student_scheduler(teacher_scheduler_config, args.student_timestep)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.prediction_type
    student_timestep = noise_scheduler.config.student_timestep

    # Teacher and fake score: one UNet, the fake score being a LoRA on the frozen teacher weights.
    fake_unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=weight_dtype, **load)
    fake_unet.requires_grad_(False).to(accelerator.device)
    fake_unet.add_adapter(unet_lora_config(args.fake_lora_rank, args.fake_lora_alpha, args.fake_lora_target_modules))
    student_dtype = weight_dtype if args.use_lora else torch.float32
    student = UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=student_dtype, **load)
    if args.use_lora:
        student.requires_grad_(False)
        student.add_adapter(unet_lora_config(args.lora_rank, args.lora_alpha))
    student.to(accelerator.device)
    cast_training_params([fake_unet, student], dtype=torch.float32)
    text_encoder.requires_grad_(False).to(accelerator.device)
    vae.requires_grad_(False).to(accelerator.device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        fake_unet.enable_gradient_checkpointing()
    student_params = list(trainable_parameters(student).values())
    fake_params = list(trainable_parameters(fake_unet).values())
    # Checkpoints hold the trainable weights only (not the frozen teacher), in float32, exactly.
    checkpoint_trainable_weights(accelerator, {"student": student, "fake_score": fake_unet})

    # 3. Optimisers: AdamW without weight decay, SwiftBrush's Adam, named as the papers do.
    student_optimizer = torch.optim.AdamW(student_params, lr=args.learning_rate, weight_decay=0.0)
    fake_optimizer = torch.optim.AdamW(fake_params, lr=args.fake_learning_rate, weight_decay=0.0)
    student_lr_scheduler = run.constant_lr_scheduler(
        student_optimizer, accelerator, args.lr_warmup_steps, args.max_train_steps
    )
    fake_lr_scheduler = run.constant_lr_scheduler(
        fake_optimizer,
        accelerator,
        args.lr_warmup_steps * args.fake_updates_per_step,
        args.max_train_steps * args.fake_updates_per_step,
    )

    # 4. Data: prompts only.
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
        generator=torch.Generator().manual_seed(args.seed),  # also what a resumed run draws from: not the global RNG
    )
    regression_dataloader = None  # DMD's regression stream: (noise, teacher latent, prompt) pairs
    if args.regression_pairs_dir is not None:
        with accelerator.main_process_first():
            pairs = reflow.load_pairs(args.regression_pairs_dir)
        unet_latent = (fake_unet.config.in_channels, fake_unet.config.sample_size, fake_unet.config.sample_size)
        if tuple(pairs.features["latent"].shape) != unet_latent:
            raise ValueError(
                f"`--regression_pairs_dir` holds latents of shape {tuple(pairs.features['latent'].shape)}; the"
                f" teacher's UNet takes {unet_latent}."
            )
        regression_dataloader = DataLoader(
            pairs.with_format("torch"),
            batch_size=args.train_batch_size,
            shuffle=True,
            collate_fn=reflow.PairCollator(tokenizer),
            num_workers=args.dataloader_num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(args.seed + 1),
        )
        regression_dataloader = accelerator.prepare(regression_dataloader)
    negative_prompts = None  # NASA-T's
    if args.negative_prompts_file is not None:
        negative_prompts = read_lines(args.negative_prompts_file, "--negative_prompts_file")
    elif args.shapesworld_negative_colours:
        negative_prompts = list(COLOURS)

    # 5. Prepare, EMA of the student, and the resumed state.
    (student, fake_unet, student_optimizer, fake_optimizer, student_lr_scheduler, fake_lr_scheduler, dataloader) = (
        accelerator.prepare(
            student, fake_unet, student_optimizer, fake_optimizer, student_lr_scheduler, fake_lr_scheduler, dataloader
        )
    )
    raw_student, raw_fake_unet = accelerator.unwrap_model(student), accelerator.unwrap_model(fake_unet)
    ema = EMAModel(student_params, decay=args.ema_decay)  # after `prepare` synced the processes
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    global_step = run.resume_or_seed(accelerator, args, "train_snoopi")

    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device, dtype=torch.float32)
    with torch.no_grad():
        null_embeds = text_encoder(tokenize(tokenizer, [""]).to(accelerator.device), return_dict=False)[0]
    latent_shape = (raw_student.config.in_channels, raw_student.config.sample_size, raw_student.config.sample_size)
    validation_prompts = args.validation_prompts or default_validation_prompts(
        args, prompts, args.num_validation_images
    )

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
        return noise_scheduler.predict_original_sample(model_output, student_timestep, noise)

    def regression_loss(pair_batch: dict) -> torch.Tensor:
        """DMD's regression term: the student's x0 from a teacher pair's noise against the teacher's latent."""
        noise = pair_batch["noise"].float()
        with torch.no_grad():
            pair_embeds = text_encoder(pair_batch["input_ids"], return_dict=False)[0]
        timesteps = torch.full((noise.shape[0],), student_timestep, device=accelerator.device)
        model_output = student(noise, timesteps, pair_embeds).sample
        prediction = noise_scheduler.predict_original_sample(model_output, student_timestep, noise)
        return reflow.latent_loss(args.regression_loss, prediction, pair_batch["latents"].float()).mean()

    def fake_score_step(original_sample: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One update of the fake-score LoRA on detached student samples, with prompt dropout."""
        batch_size = original_sample.shape[0]
        timesteps = sample_timesteps(batch_size, num_train_timesteps, device=accelerator.device)
        noise = torch.randn_like(original_sample)
        sample = noise_scheduler.add_noise(original_sample.detach(), noise, timesteps)
        dropped = torch.rand(batch_size, device=accelerator.device) < args.fake_prompt_dropout
        prompt_embeds = torch.where(dropped[:, None, None], null_embeds.expand_as(prompt_embeds), prompt_embeds)
        model_output = fake_unet(sample, timesteps, prompt_embeds).sample
        loss = fake_score_loss(model_output, noise, sample, alphas_cumprod, timesteps, prediction_type)
        run.optimizer_step(accelerator, loss, fake_params, fake_optimizer, fake_lr_scheduler, args.max_grad_norm)
        return loss

    pipeline_settings = {
        "scheduler": noise_scheduler,
        "negative_attention": {"method": "nasa", "scale": args.nasa_scale},
    }

    def validation_pipeline() -> OneStepPipeline:
        pipeline = OneStepPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=raw_student, **pipeline_settings
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    # 6. Training.
    data = run.resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    if regression_dataloader is not None:
        regression_data = run.resumed_batches(
            accelerator, regression_dataloader, batches_done=global_step * args.gradient_accumulation_steps
        )
    regression = torch.zeros((), device=accelerator.device)  # logged as 0 without a regression stream
    progress = run.progress_bar(accelerator, args.max_train_steps, global_step)
    samples = []  # for the step journal: the data is prompts
    while global_step < args.max_train_steps:
        batch = next(data)
        samples.append(run.text_fingerprints(batch["prompts"]))
        with accelerator.accumulate(student, fake_unet):
            with torch.no_grad():
                prompt_embeds = text_encoder(batch["input_ids"], return_dict=False)[0]
            batch_null_embeds = null_embeds.expand_as(prompt_embeds)
            batch_size = prompt_embeds.shape[0]

            # 6a. Student turn: VSD with the same per-sample guidance scale in both teachers. On a NASA-T step the
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
            noise = torch.randn_like(original_sample)
            sample = noise_scheduler.add_noise(original_sample.detach(), noise, timesteps)
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
            total_loss = student_loss
            if regression_dataloader is not None:
                regression = regression_loss(next(regression_data))
                total_loss = student_loss + args.regression_weight * regression
            run.optimizer_step(
                accelerator, total_loss, student_params, student_optimizer, student_lr_scheduler, args.max_grad_norm
            )

            # 6b. Fake-score turn(s): the first on this step's samples, further ones on fresh noise.
            fake_loss = fake_score_step(original_sample, prompt_embeds)
            for _ in range(args.fake_updates_per_step - 1):
                with torch.no_grad():
                    fresh_sample = generate(prompt_embeds)
                fake_loss = fake_score_step(fresh_sample, prompt_embeds)

        if not accelerator.sync_gradients:
            continue
        ema.step(student_params)
        global_step += 1
        logs = run.mean_over_processes(  # kappa too: the global batch's mean scale, not process 0's
            accelerator, vsd_loss=student_loss, fake_score_loss=fake_loss, regression_loss=regression,
            kappa=guidance_scale.mean(),
        )  # fmt: skip
        if run.end_step(accelerator, args, progress, global_step, logs, samples=samples):
            generator = [torch.Generator().manual_seed(args.seed + i) for i in range(len(validation_prompts))]
            with run.ema_weights(ema, student_params), accelerator.autocast():
                images = validation_pipeline()(validation_prompts, generator=generator).images
            save_image_grid(images, output_dir / "validation" / f"step-{global_step}.png")

    # 7. The EMA student as a OneStepPipeline folder on the teacher's components (with `--use_lora`, also its LoRA
    # in Diffusers' format, merged into the teacher's float32 weights for the folder), its default sampler and card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.copy_to(student_params)
        student_unet = {} if args.use_lora else {"unet": raw_student}
        pipeline = OneStepPipeline.from_pretrained(location, **load, **pipeline_settings, **student_unet)
        if args.use_lora:
            save_unet_lora(OneStepPipeline, raw_student, output_dir)
            pipeline.load_lora_weights(output_dir, use_safetensors=True)  # never a pickle fallback
            pipeline.fuse_lora()
            pipeline.unload_lora_weights()
        pipeline.save_pretrained(str(output_dir))
        default_inference = {"num_inference_steps": 1, "guidance_scale": 1.0}
        write_fastgen_metadata(output_dir, {"method": "snoopi", "default_inference": default_inference})
        publish(
            args,
            template="snoopi",
            fields=card_fields(args, student_timestep, validation_prompts[0]),
            tags=["text-to-image", "one-step", "snoopi", "score-distillation"] + (["lora"] if args.use_lora else []),
            base_model=args.pretrained_model_name_or_path,
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
