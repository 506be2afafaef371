#!/usr/bin/env python
"""Train a PPAP guide on clean ShapesWorld images: the "off-the-shelf" model PPAP's experts are made from.

Two tasks, both `PPAPGuideNet` (a different network from the judge, which scores what a guide guides):
  - `--task classification`: the shape (circle, square, triangle, cross), cross-entropy;
  - `--task regression`: the shape's centre (x, y), scaled to [-1, 1] (pixel 0 -> -1, pixel 32 -> 1), squared error.
The guide knows nothing of diffusion: clean images only (plus faint pixel noise, as a real off-the-shelf model
would have seen some augmentation).

    accelerate launch training/train_ppap_guides.py --task classification --output_dir runs/ppap-classifier \\
        --max_train_steps 1500 --resume_from_checkpoint latest
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fastgen_diffusers.guidance.shapesworld import shape_centre
from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.shapes import build_dataset
from fastgen_diffusers.shapes.captions import SHAPES
from fastgen_diffusers.shapes.judge import to_uint8_array
from fastgen_diffusers.shapes.render import IMAGE_SIZE
from fastgen_diffusers.training.arguments import add_common_training_args, check_common_training_args
from fastgen_diffusers.training.data import images_to_tensor
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

TASK_LABELS = {"classification": list(SHAPES), "regression": ["centre_x", "centre_y"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    parser.add_argument("--task", type=str, required=True, choices=sorted(TASK_LABELS))
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_train_samples", type=int, default=100_000)
    parser.add_argument("--noise_std", type=float, default=0.03, help="Largest pixel-noise std, in [-1, 1] units.")
    parser.add_argument(
        "--num_eval_samples", type=int, default=1000, help="Clean evaluation images for the final score."
    )
    args = parser.parse_args(argv)
    check_common_training_args(args)
    return args


def centre_to_pixels(values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] image coordinates (`shape_centre`'s) -> pixels."""
    return (values + 1) * IMAGE_SIZE / 2


class GuideCollator:
    def __init__(self, task: str):
        self.task = task

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [row["image"] for row in rows]
        if self.task == "classification":
            labels = torch.tensor([SHAPES.index(row["shape"]) for row in rows])
        else:
            labels = torch.tensor([shape_centre(image) for image in to_uint8_array(images)], dtype=torch.float32)
        return {"pixel_values": images_to_tensor(images), "labels": labels}


def guide_loss(task: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(outputs, labels)
    return F.mse_loss(outputs, labels)


@torch.no_grad()
def evaluate_guide(net: PPAPGuideNet, task: str, num_samples: int, seed: int) -> dict[str, float]:
    """Accuracy (classifier) or mean centre error in pixels (regressor) on clean evaluation images."""
    rows = build_dataset(num_samples, seed=seed, split="eval")
    batch = GuideCollator(task)([rows[i] for i in range(num_samples)])
    outputs = net.eval()(batch["pixel_values"].to(net.device)).cpu()
    if task == "classification":
        return {"accuracy": (outputs.argmax(1) == batch["labels"]).float().mean().item()}
    error = (centre_to_pixels(outputs) - centre_to_pixels(batch["labels"])).norm(dim=1)
    return {"mean_centre_error_px": error.mean().item()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = start_run(args)
    net = PPAPGuideNet(num_outputs=len(TASK_LABELS[args.task]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=0.01)
    dataset = build_dataset(args.num_train_samples, seed=args.seed, split="train", include_held_out=True)
    dataloader = DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=GuideCollator(args.task), drop_last=True,
        num_workers=args.dataloader_num_workers,
        # Its own generator: without one, each new iterator (a resume's too) draws from the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    net, optimizer, dataloader = accelerator.prepare(net, optimizer, dataloader)

    global_step = resume_or_seed(accelerator, args, "train_ppap_guides")
    batches = resumed_batches(accelerator, dataloader, global_step * args.gradient_accumulation_steps)

    progress = progress_bar(accelerator, args.max_train_steps, global_step)
    net.train()
    samples = []  # for the step journal: each image identifies its row
    while global_step < args.max_train_steps:
        batch = next(batches)
        samples.append(fingerprints(batch["pixel_values"]))
        with accelerator.accumulate(net):
            pixels = batch["pixel_values"]
            noise_level = torch.rand(pixels.shape[0], 1, 1, 1, device=pixels.device) * args.noise_std
            loss = guide_loss(args.task, net(pixels + noise_level * torch.randn_like(pixels)), batch["labels"])
            optimizer_step(accelerator, loss, net.parameters(), optimizer)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = mean_over_processes(accelerator, loss=loss)  # the global batch's, not process 0's
        end_step(accelerator, args, progress, global_step, logs, samples=samples)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(net)
        net.save_pretrained(str(output_dir))
        score = evaluate_guide(net, args.task, args.num_eval_samples, args.seed)
        record = {"task": args.task, "labels": TASK_LABELS[args.task], **score}
        (output_dir / "guide.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record))
    accelerator.end_training()


if __name__ == "__main__":
    main()
