#!/usr/bin/env python
"""Train the ShapesWorld judge CNN on clean images (every attribute, held-out pairs included).

The judge reads shape with this network and uses its penultimate features for `shapes_fd`.
Mild pixel noise in training keeps it steady on generated images, which are never quite clean.

    accelerate launch training/train_judge.py --output_dir runs/shapes-judge --max_train_steps 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastgen_diffusers.shapes import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, build_dataset
from fastgen_diffusers.shapes.judge import ShapesJudge, ShapesJudgeNet
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.checkpointing import checkpoint_step, resolve_resume_path, save_checkpoint
from fastgen_diffusers.training.data import images_to_tensor
from fastgen_diffusers.training.hub import push_folder_to_hub, save_model_card, training_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_train_samples", type=int, default=200_000)
    parser.add_argument("--noise_std", type=float, default=0.06, help="Largest pixel-noise std, in [-1, 1] units.")
    parser.add_argument("--num_eval_samples", type=int, default=2000, help="Held-out images for the final accuracy.")
    args = parser.parse_args(argv)
    check_common_training_args(args)
    return args


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    labels = {name: torch.tensor([ATTRIBUTE_VALUES[name].index(row[name]) for row in rows]) for name in ATTRIBUTE_NAMES}
    return {"pixel_values": images_to_tensor([row["image"] for row in rows]), **labels}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    set_seed(args.seed)
    net = ShapesJudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate)
    dataset = build_dataset(args.num_train_samples, seed=args.seed, split="train", include_held_out=True)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    net, optimizer, dataloader = accelerator.prepare(net, optimizer, dataloader)

    global_step = 0
    resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
    epoch, skip = divmod(global_step, len(dataloader))

    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        dataloader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(dataloader, skip) if skip else dataloader:
            with accelerator.accumulate(net):
                pixels = batch["pixel_values"]
                noise_level = torch.rand(pixels.shape[0], 1, 1, 1, device=pixels.device) * args.noise_std
                logits = net(pixels + noise_level * torch.randn_like(pixels))
                loss = sum(F.cross_entropy(logits[name], batch[name]) for name in ATTRIBUTE_NAMES)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=loss.item())
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                break
        epoch, skip = epoch + 1, 0

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(net)
        net.save_pretrained(str(output_dir))
        accuracy = held_out_accuracy(ShapesJudge(net), args.num_eval_samples, args.seed)
        (output_dir / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
        print(json.dumps(accuracy))
        table = "\n".join(f"| {name} | {value:.4f} |" for name, value in accuracy.items())
        save_model_card(
            output_dir,
            template="shapes_judge",
            fields={"command": training_command(), "n": str(args.num_eval_samples), "accuracy_table": table},
            tags=["image-classification", "shapesworld"],
        )
        if args.push_to_hub:
            push_folder_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
    accelerator.end_training()


def held_out_accuracy(judge: ShapesJudge, num_samples: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy of the whole judge (analytic read-outs and CNN) on clean evaluation images."""
    rows = build_dataset(num_samples, seed=seed, split="eval")[:]
    predicted = judge.read(rows["image"])
    return {
        name: sum(getattr(p, name) == rows[name][i] for i, p in enumerate(predicted)) / num_samples
        for name in ATTRIBUTE_NAMES
    }


if __name__ == "__main__":
    main()
