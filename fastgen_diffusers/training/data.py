"""Batches for text-to-image training: PIL images to [-1, 1] tensors and captions to token ids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) float tensor in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


class TextImageCollator:
    """Collate `datasets` rows with `image` and `caption` columns into pixel values and input ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": images_to_tensor([row["image"] for row in rows]),
            "input_ids": tokenize(self.tokenizer, [row["caption"] for row in rows]),
        }
