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
from torch.utils.data import DataLoader

from fastgen_diffusers.shapes import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, build_dataset
from fastgen_diffusers.shapes.judge import ShapesJudge, ShapesJudgeNet
from fastgen_diffusers.training import arguments, run
from fastgen_diffusers.training.data import images_to_tensor
from fastgen_diffusers.training.hub import publish


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.training_parser(__doc__)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_train_samples", type=int, default=200_000)
    parser.add_argument("--noise_std", type=float, default=0.06, help="Largest pixel-noise std, in [-1, 1] units.")
    parser.add_argument("--num_eval_samples", type=int, default=2000, help="Held-out images for the final accuracy.")
    args = parser.parse_args(argv)
    arguments.check_common_training_args(args)
    return args


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    labels = {
        name: torch.tensor([ATTRIBUTE_VALUES[name].index(row[name]) for row in rows]) for name in ATTRIBUTE_NAMES
    }
    return {"pixel_values": images_to_tensor([row["image"] for row in rows]), **labels}


def held_out_accuracy(judge: ShapesJudge, num_samples: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy of the whole judge (analytic read-outs and CNN) on clean evaluation images."""
    rows = build_dataset(num_samples, seed=seed, split="eval")[:]
    predicted = judge.read(rows["image"])
    return {
        name: sum(getattr(p, name) == rows[name][i] for i, p in enumerate(predicted)) / num_samples
        for name in ATTRIBUTE_NAMES
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # 1. The run, the network, its data.
    accelerator = run.start_run(args)
    net = ShapesJudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate)
    dataset = build_dataset(args.num_train_samples, seed=args.seed, split="train", include_held_out=True)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    net, optimizer, dataloader = accelerator.prepare(net, optimizer, dataloader)
    global_step = run.resume_or_seed(accelerator, args, "train_judge")

    # 2. Training: cross-entropy on every attribute, on images with a little pixel noise.
    data = run.resumed_batches(accelerator, dataloader, batches_done=global_step * args.gradient_accumulation_steps)
    progress = run.progress_bar(accelerator, args.max_train_steps, global_step)
    samples = []  # for the step journal: each image identifies its row
    while global_step < args.max_train_steps:
        batch = next(data)
        samples.append(run.fingerprints(batch["pixel_values"]))
        with accelerator.accumulate(net):
            pixels = batch["pixel_values"]
            noise_level = torch.rand(pixels.shape[0], 1, 1, 1, device=pixels.device) * args.noise_std
            logits = net(pixels + noise_level * torch.randn_like(pixels))
            loss = sum(F.cross_entropy(logits[name], batch[name]) for name in ATTRIBUTE_NAMES)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
            logs = run.mean_over_processes(accelerator, loss=loss)  # the global batch's, not process 0's
            run.end_step(accelerator, args, progress, global_step, logs, samples=samples)

    # 3. The network, its accuracy on held-out images, and its card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(net)
        net.save_pretrained(str(output_dir))
        accuracy = held_out_accuracy(ShapesJudge(net), args.num_eval_samples, args.seed)
        (output_dir / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
        print(json.dumps(accuracy))
        table = "\n".join(f"| {name} | {value:.4f} |" for name, value in accuracy.items())
        publish(
            args,
            template="shapes_judge",
            fields={"n": str(args.num_eval_samples), "accuracy_table": table},
            tags=["image-classification", "shapesworld"],
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
