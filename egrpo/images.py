"""How images travel between stages: uint8 (B, 3, H, W) tensors, round(x * 255) of the decoded [0, 1] image.

Rollouts hand their images to reward servers (through the object store), report grids and the CLI. uint8 is a
quarter of float32's bytes (FLUX at 720x720: 1.6 MB an image instead of 6.2 MB), and it is what peer
implementations score too: they turn images into uint8 / PIL before a reward model's preprocessing.
"""

from __future__ import annotations

import torch


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as uint8 round(x * 255), on the same device. Values outside [0, 1] are clamped
    and NaN pixels become 0, so a caller that must know about them checks `images.isfinite()` first."""
    return (torch.nan_to_num(images.detach().float(), nan=0.0).clamp(0, 1) * 255).round().to(torch.uint8)


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 x / 255 in [0, 1]; float images are returned unchanged."""
    return images.float() / 255 if images.dtype == torch.uint8 else images
