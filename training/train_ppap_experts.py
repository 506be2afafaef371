#!/usr/bin/env python
"""Train PPAP's noise-range experts for an off-the-shelf guide by data-free knowledge transfer.

No labelled data: the diffusion model generates the training images from a prompt source (`--prompts_file`,
`--dataset_name` or `--shapesworld_prompts`, plus `--empty_prompt_prob` of empty ones), the guide labels them clean
(it reads the decoded image; the prompts are never labels, and captions that name what the guide reads give it
clean images to label confidently, docs/ppap.md), and each expert learns to match the guide on the latent noised into its own log-SNR
range: KL to the guide's softmax sharpened at `--temperature` (0.25, as the original) for a classifier, squared
error for a regressor. Experts train one after another, each warm-started from the previous one (adapter weights
and optimizer state, as the original), with the learning rate annealed linearly to zero within each expert.

    accelerate launch training/train_ppap_experts.py --guide_path runs/ppap-classifier \\
        --pretrained_model_name_or_path shapes-2rf --num_inference_steps 4 --prompts_file prompts.txt \\
        --output_dir runs/ppap-classifier-experts --max_train_steps 3000 --resume_from_checkpoint latest

The output folder is a `PPAPGuidance` (`PPAPGuidance.from_pretrained(output_dir)`): guide/, experts/expert_i/
(peft adapters only) and ppap_config.json, with a model card. Generated latents and the guide's labels are kept in
`--generated_dir` (shards, so an interrupted generation resumes too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from fastgen_diffusers.guidance.conversions import vp_coefficients
from fastgen_diffusers.guidance.ppap import TASKS, PPAPGuidance, expert_name
from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.pipelines.auto import resolve_model_location
from fastgen_diffusers.pipelines.core import FastDiffusionPipeline
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.checkpointing import checkpoint_step, resolve_resume_path, save_checkpoint
from fastgen_diffusers.training.hub import push_to_hub_or_exit, save_model_card
from fastgen_diffusers.training.prompts import (
    add_prompt_args,
    check_prompt_args,
    cycle_with_empty_prompts,
    describe_prompt_source,
    load_prompts,
)
from fastgen_diffusers.utils.safe_loading import check_weight_files
from fastgen_diffusers.training.run import (
    fingerprints,
    mean_over_processes,
    optimizer_step,
    record_step,
    resumed_batches,
    start_run,
    trim_step_journal,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    add_prompt_args(parser)
    group = parser.add_argument_group("guide and experts")
    group.add_argument("--guide_path", type=str, required=True, help="A saved `PPAPGuideNet` folder.")
    group.add_argument("--task", type=str, default=None, choices=TASKS, help="Default: the guide's guide.json.")
    group.add_argument("--labels", type=str, nargs="+", default=None, help="Default: the guide's guide.json.")
    group.add_argument("--num_experts", type=int, default=5)
    group.add_argument("--lora_rank", type=int, default=16, help="The original's rank.")
    group.add_argument("--lora_alpha", type=int, default=16)
    group.add_argument("--temperature", type=float, default=0.25, help="Sharpening of the guide's softmax (KL).")
    group.add_argument("--learning_rate", type=float, default=1e-3)
    group.add_argument("--weight_decay", type=float, default=0.05)
    group = parser.add_argument_group("generated training images")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="The diffusion model.")
    group.add_argument("--generated_dir", type=str, default=None, help="Default: `{output_dir}-generated`.")
    group.add_argument("--num_generated", type=int, default=3000)
    group.add_argument(
        "--num_validation_generated", type=int, default=300, help="Of those, held out to score experts."
    )
    group.add_argument("--shard_size", type=int, default=250)
    group.add_argument("--generation_batch_size", type=int, default=50)
    group.add_argument("--num_inference_steps", type=int, default=25)
    group.add_argument("--guidance_scale", type=float, default=1.0)
    group.add_argument("--empty_prompt_prob", type=float, default=0.25)
    args = parser.parse_args(argv)
    check_common_training_args(args)
    check_prompt_args(args)
    if args.num_experts < 1 or args.max_train_steps % args.num_experts:
        raise ValueError(
            f"`--max_train_steps` ({args.max_train_steps}) must split evenly over `--num_experts` ({args.num_experts})."
        )
    if not 0 < args.num_validation_generated < args.num_generated:
        raise ValueError("`--num_validation_generated` must be positive and below `--num_generated`.")
    if not 0.0 <= args.empty_prompt_prob <= 1.0:
        raise ValueError(f"`--empty_prompt_prob` must lie in [0, 1], got {args.empty_prompt_prob}.")
    if args.temperature <= 0:
        raise ValueError(f"`--temperature` must be positive, got {args.temperature}.")
    return args


def generation_prompts(args: argparse.Namespace) -> list[str]:
    """One prompt per generated image: the source's prompts in turn, a random `--empty_prompt_prob` share emptied."""
    return cycle_with_empty_prompts(load_prompts(args), args.num_generated, args.empty_prompt_prob, args.seed)


@torch.no_grad()
def generate_shards(accelerator, args, generated_dir: Path) -> None:
    """Clean latents from the diffusion model, `--shard_size` a file, each process taking every n-th shard.

    Shards already on disk are kept, so a killed generation resumes. Each shard is written to a `.partial` file
    and renamed, so none is ever half-written.
    """
    prompts = generation_prompts(args)
    num_shards = -(-args.num_generated // args.shard_size)
    mine = [s for s in range(num_shards) if s % accelerator.num_processes == accelerator.process_index]
    todo = [s for s in mine if not (generated_dir / f"latents-{s:05d}.safetensors").exists()]
    if not todo:
        return
    location = resolve_model_location(args.pretrained_model_name_or_path)
    pipe = FastDiffusionPipeline.from_pretrained(location, use_safetensors=True)
    pipe.to(accelerator.device).set_progress_bar_config(disable=True)
    generated_dir.mkdir(parents=True, exist_ok=True)
    for shard in tqdm(todo, desc="generating", disable=not accelerator.is_local_main_process):
        indices = list(range(shard * args.shard_size, min((shard + 1) * args.shard_size, args.num_generated)))
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + shard)
        latents = []
        for start in range(0, len(indices), args.generation_batch_size):
            batch = [prompts[i] for i in indices[start : start + args.generation_batch_size]]
            latents.append(pipe(prompt=batch, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                generator=generator, output_type="latent").images.float().cpu())  # fmt: skip
        path = generated_dir / f"latents-{shard:05d}.safetensors"
        save_file({"latents": torch.cat(latents)}, str(path) + ".partial")
        os.replace(str(path) + ".partial", path)


@torch.no_grad()
def guide_labels(args, guide: PPAPGuideNet, generated_dir: Path, device) -> tuple[torch.Tensor, torch.Tensor]:
    """All generated latents and the guide's outputs on their decoded (clean) images, cached per guide."""
    num_shards = -(-args.num_generated // args.shard_size)
    latents = torch.cat(
        [load_file(str(generated_dir / f"latents-{s:05d}.safetensors"))["latents"] for s in range(num_shards)]
    )
    weights = Path(args.guide_path) / "diffusion_pytorch_model.safetensors"
    cache = generated_dir / f"labels-{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}.safetensors"  # per guide
    if cache.exists():
        return latents, load_file(str(cache))["outputs"]
    location = resolve_model_location(args.pretrained_model_name_or_path)
    vae = FastDiffusionPipeline.from_pretrained(location, use_safetensors=True).vae.to(device)
    outputs = []
    for start in range(0, len(latents), 100):
        pixels = vae.decode(latents[start : start + 100].to(device) / vae.config.scaling_factor).sample.clamp(-1, 1)
        outputs.append(guide(pixels).float().cpu())
    outputs = torch.cat(outputs)
    save_file({"outputs": outputs}, str(cache) + ".partial")
    os.replace(str(cache) + ".partial", cache)
    return latents, outputs


def noised(latents: torch.Tensor, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """VP-noised latents alpha z0 + sigma eps at log-SNRs drawn uniformly in [low, high], one per sample."""
    log_snr = low + (high - low) * torch.rand(latents.shape[0], generator=generator).to(latents.device)
    alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in vp_coefficients(log_snr))
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    return alpha * latents + sigma * noise


def distillation_loss(
    task: str, expert_outputs: torch.Tensor, guide_outputs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(guide / T) || softmax(expert)) for a classifier (PPAP's loss), squared error for a regressor."""
    if task == "classification":
        target = F.softmax(guide_outputs / temperature, dim=1)
        return F.kl_div(F.log_softmax(expert_outputs, dim=1), target, reduction="batchmean")
    return F.mse_loss(expert_outputs, guide_outputs)


@torch.no_grad()
def score_experts(guidance: PPAPGuidance, latents: torch.Tensor, guide_outputs: torch.Tensor, seed: int) -> list[dict]:
    """Per range: agreement with the guide's clean answer (classifier) or mean squared error (regressor), for the
    expert and for the guide itself fed the same noised latent through a latent stem it never had (chance level).
    Here only the expert's number is meaningful; the naive baseline is measured in the sampler (benchmarks)."""
    rows = []
    for i in range(guidance.num_experts):
        high, low = guidance.edges[i], guidance.edges[i + 1]
        x = noised(latents, low, high, torch.Generator().manual_seed(seed + i))
        guidance.experts.set_adapter(expert_name(i))
        outputs = guidance.experts(x.to(guidance.guide.device)).cpu()
        if guidance.task == "classification":
            value = (outputs.argmax(1) == guide_outputs.argmax(1)).float().mean().item()
        else:
            value = F.mse_loss(outputs, guide_outputs).item()
        rows.append(
            {"expert": i, "log_snr": [low, high], "agreement" if guidance.task == "classification" else "mse": value}
        )
    return rows


def carry_over(guidance: PPAPGuidance, previous: int, current: int) -> None:
    """Warm start: expert `current` begins as a copy of expert `previous` (LoRA, stem and norms)."""
    state = get_peft_model_state_dict(guidance.experts, adapter_name=expert_name(previous))
    set_peft_model_state_dict(guidance.experts, state, adapter_name=expert_name(current))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    generated_dir = Path(args.generated_dir or f"{output_dir}-generated")
    accelerator = start_run(args)
    started = time.perf_counter()

    guide_record = (
        json.loads((Path(args.guide_path) / "guide.json").read_text())
        if (Path(args.guide_path) / "guide.json").is_file()
        else {}
    )
    task = args.task or guide_record.get("task")
    labels = args.labels or guide_record.get("labels")
    if task is None or labels is None:
        raise ValueError("Give `--task` and `--labels`: the guide folder has no guide.json that says them.")
    for location in (args.guide_path, resolve_model_location(args.pretrained_model_name_or_path)):
        check_weight_files(location)  # safetensors only: a pickle is refused, a damaged file named
    guide = PPAPGuideNet.from_pretrained(args.guide_path, use_safetensors=True)
    guide = guide.to(accelerator.device).eval().requires_grad_(False)

    generate_shards(accelerator, args, generated_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        guide_labels(args, guide, generated_dir, accelerator.device)
    accelerator.wait_for_everyone()
    latents, guide_outputs = guide_labels(args, guide, generated_dir, accelerator.device)
    n_val = args.num_validation_generated
    train_set = TensorDataset(latents[:-n_val], guide_outputs[:-n_val])

    guidance = PPAPGuidance.from_guide(
        guide, task, labels, args.num_experts, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha
    )
    guidance.guide.to(accelerator.device)
    guidance.experts.to(accelerator.device)
    steps_per_expert = args.max_train_steps // args.num_experts

    global_step = 0
    resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        global_step = checkpoint_step(resume_path)  # each process's random state comes back with the checkpoint
    else:
        set_seed(args.seed, device_specific=True)  # each process its own noise and log-SNRs, as `run.resume_or_seed`
    trim_step_journal(accelerator, output_dir, global_step)
    optimizer_state = None
    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        stage, stage_step = divmod(global_step, steps_per_expert)
        high, low = guidance.edges[stage], guidance.edges[stage + 1]
        accelerator.free_memory()  # drop the previous expert's prepared objects, so checkpoints hold this one's only
        guidance.experts.set_adapter(expert_name(stage))
        guidance.experts.train()
        optimizer = torch.optim.AdamW(
            [p for p in guidance.experts.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
        )  # fmt: skip
        dataloader = DataLoader(  # its own generator: without one, each new iterator draws from the global RNG
            train_set, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(args.seed),
        )  # fmt: skip
        model, optimizer, dataloader = accelerator.prepare(guidance.experts, optimizer, dataloader)
        if resume_path is not None:
            # All experts' weights so far and the optimizer (the previous expert's, if this one has not started).
            accelerator.load_state(str(resume_path))
            resume_path = None
        elif optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        if stage > 0 and stage_step == 0:
            carry_over(guidance, stage - 1, stage)
        batches = resumed_batches(accelerator, dataloader, global_step * args.gradient_accumulation_steps)
        samples = []  # for the step journal: each clean latent identifies its generated image
        while stage_step < steps_per_expert:
            clean, targets = next(batches)
            samples.append(fingerprints(clean))
            with accelerator.accumulate(model):
                for group in optimizer.param_groups:  # linear decay to zero within each expert, as the original
                    group["lr"] = args.learning_rate * (1 - stage_step / steps_per_expert)
                loss = distillation_loss(task, model(noised(clean, low, high)), targets, args.temperature)
                optimizer_step(accelerator, loss, model.parameters(), optimizer)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            stage_step += 1
            progress.update(1)
            progress.set_postfix(expert=stage, loss=loss.item())
            logs = {"expert": stage, **mean_over_processes(accelerator, loss=loss)}  # the global batch's loss
            record_step(accelerator, output_dir, global_step, logs, samples)
            if global_step % args.checkpointing_steps == 0 or stage_step == steps_per_expert:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        optimizer_state = optimizer.state_dict()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        guidance.experts = accelerator.unwrap_model(guidance.experts).eval()
        guidance.save_pretrained(output_dir)
        scores = score_experts(guidance, latents[-n_val:], guide_outputs[-n_val:], args.seed)
        record = {
            "task": task,
            "labels": labels,
            "parameters": guidance.parameter_counts(),
            "experts": scores,
            "training_seconds": time.perf_counter() - started,
            "prompt_source": describe_prompt_source(args),
        }
        (output_dir / "experts.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record))
        write_card(args, output_dir, record)
        if args.push_to_hub:
            push_to_hub_or_exit(args)
    accelerator.end_training()


def write_card(args: argparse.Namespace, output_dir: Path, record: dict) -> None:
    guide_commands_file = Path(args.guide_path) / "training_commands.txt"
    guide_commands = guide_commands_file.read_text().strip() if guide_commands_file.is_file() else "(not recorded)"
    metric = "agreement" if record["task"] == "classification" else "mse"
    table = "\n".join(
        f"| {row['expert']} | [{row['log_snr'][0]:.2f}, {row['log_snr'][1]:.2f}] | {row[metric]:.3f} |"
        for row in record["experts"]
    )
    save_model_card(
        output_dir,
        template="ppap",
        fields={
            "task": record["task"],
            "labels": ", ".join(record["labels"]),
            "num_experts": str(args.num_experts),
            "base_model": args.pretrained_model_name_or_path,
            "guide_parameters": f"{record['parameters']['guide']:,}",
            "expert_parameters": f"{record['parameters']['per_expert']:,}",
            "metric": metric,
            "expert_table": table,
            "minutes": f"{record['training_seconds'] / 60:.1f}",
            "guide_commands": guide_commands,
            "command": (output_dir / "training_commands.txt").read_text().strip(),
        },
        tags=["ppap", "guidance", "lora"],
    )


if __name__ == "__main__":
    main()
