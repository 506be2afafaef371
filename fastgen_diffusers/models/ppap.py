"""PPAP guide networks: small CNNs trained on clean images, and their latent-input twin for the experts.

A guide (`PPAPGuideNet`, pixel input) is the "off-the-shelf" model: a shape classifier or a regressor,
trained on clean 32x32 ShapesWorld images and knowing nothing of diffusion. PPAP's experts are that same
network with a new stem that reads the 4-channel latent (`PPAPGuideNet.latent_input_from`): the guide's
stem turns 32x32 pixels into 16x16 features, which is exactly the latent's size, so a stride-1 stem on the
latent lands on the same feature map and the rest of the guide is reused as it is (plus LoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(x + self.norm2(self.conv2(h)))


class PPAPGuideNet(ModelMixin, ConfigMixin):
    """A small ResNet: stem, one residual block per width with stride-2 convolutions between, flatten, MLP head.

    The head flattens rather than pools, so a regressor of the shape's position can see where things are.
    `in_channels=3, stem_stride=2` is the pixel guide (32x32 -> 16x16 after the stem); `in_channels=4,
    stem_stride=1` reads a 16x16 latent into the same 16x16 feature map (the experts' backbone).
    """

    @register_to_config
    def __init__(
        self,
        num_outputs: int = 4,
        in_channels: int = 3,
        stem_stride: int = 2,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        norm_num_groups: int = 8,
        feature_size: int = 16,
        head_dim: int = 128,
    ):
        super().__init__()
        first = block_out_channels[0]
        self.stem = nn.Conv2d(in_channels, first, 3, stride=stem_stride, padding=1)
        self.stem_norm = nn.GroupNorm(norm_num_groups, first)
        self.blocks = nn.ModuleList(_ResidualBlock(c, norm_num_groups) for c in block_out_channels)
        self.downsamplers = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(block_out_channels, block_out_channels[1:])
        )
        final_size = feature_size // 2 ** (len(block_out_channels) - 1)
        self.head_hidden = nn.Linear(block_out_channels[-1] * final_size**2, head_dim)
        self.head_out = nn.Linear(head_dim, num_outputs)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """Logits (classifier) or predicted values (regressor), (N, num_outputs)."""
        h = F.silu(self.stem_norm(self.stem(sample)))
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        return self.head_out(F.silu(self.head_hidden(h.flatten(1))))

    @classmethod
    def latent_input_from(cls, guide: "PPAPGuideNet", latent_channels: int = 4) -> "PPAPGuideNet":
        """The guide with a new stride-1 stem reading `latent_channels`; every other weight copied from the guide.

        The new stem starts at a fixed seed, so two calls give the same network (each expert then trains its
        own copy of the stem).
        """
        config = dict(guide.config)
        config.update(in_channels=latent_channels, stem_stride=1)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone = cls(**config)
        state = {k: v for k, v in guide.state_dict().items() if not k.startswith("stem.")}
        backbone.load_state_dict(state, strict=False)  # copies into the backbone's float32 parameters
        return backbone


# What PPAP adapts in each expert, named as in `PPAPGuideNet`: LoRA on every convolution after the stem and on
# the head (the original: LoRA on the ResNet convolutions), the new latent stem and all norms fully trainable
# (the original trains BatchNorm's scale and shift).
EXPERT_LORA_TARGETS = r".*\.(conv1|conv2)|downsamplers\.\d+|head_hidden|head_out"  # a regex, as peft takes it
EXPERT_FULLY_TRAINED = ["stem", "stem_norm", "norm1", "norm2"]
