"""Attention processors that bring negative prompts to one-step students: NASA (SNOOPI) and NAG."""

from .nasa import (
    NAGAttnProcessor,
    NASAAttnProcessor,
    NegativeAttnProcessor,
    cross_attention_modules,
    nag_attention_output,
    nasa_attention_output,
    negative_attention,
)


__all__ = [
    "NAGAttnProcessor",
    "NASAAttnProcessor",
    "NegativeAttnProcessor",
    "cross_attention_modules",
    "nag_attention_output",
    "nasa_attention_output",
    "negative_attention",
]
