"""CPU-side tensor conversions shared by training and evaluation, so both see identical inputs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics, as ViT image processors use.
IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images_to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> normalized float [B, 3, size, size] (bilinear resize)."""
    return normalize(images_to_unit(images, size))


def images_to_unit(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> float [B, 3, size, size] in [0, 1] (bilinear resize), for
    objectives that augment before normalizing."""
    x = torch.stack(
        [torch.from_numpy(np.array(im, dtype=np.uint8)) for im in images]
    )  # copies: decoded arrays may be read-only
    x = x.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the ImageNet-normalized values the encoders take (on x's device)."""
    return (x - IMAGE_MEAN.to(x.device, x.dtype)) / IMAGE_STD.to(x.device, x.dtype)
