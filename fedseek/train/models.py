"""Model zoo: a tabular MLP and a small image CNN, both DP-ready (no BatchNorm; GroupNorm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedseek.names import MODEL_KINDS


class TabularMLP(nn.Module):
    """MLP for tabular records; tanh activations keep DP-SGD gradients well-scaled."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        """Linear + tanh per `hidden` width, then a linear head to `num_classes` logits."""
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of records (any trailing shape is flattened)."""
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv blocks with GroupNorm for small images (8x8 digits up to 32x32)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16) -> None:
        """Two conv + GroupNorm blocks, adaptive pooling, a linear head (sized for `image_size`)."""
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.Tanh(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(4 if image_size >= 8 else 2),
        )
        side = 4 if image_size >= 8 else 2
        self.head = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (N, C, H, W), or (N, H, W) read as one channel."""
        if x.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


def seed_torch(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed torch's CPU generator, and CUDA's when training there (what torch.manual_seed does for these runs).

    torch.manual_seed also registers a lazy seeding of every accelerator backend that is not initialised (CUDA, XPU,
    MTIA), each with a formatted stack trace of the caller: a cost that grows with the call stack, paid per site call
    in every Ray actor of a simulation with thousands of site calls per round.
    """
    torch.default_generator.manual_seed(int(seed))
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(int(seed))


def build_model(
    kind: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,), seed: int | None = None, width: int = 16
) -> nn.Module:
    """Build a model by name ('mlp' | 'cnn') for inputs of `input_shape` (without batch dim); `hidden` sizes the MLP, `width` the CNN."""
    if seed is not None:
        seed_torch(seed)  # parameters are initialised on the CPU
    if kind == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= int(d)
        return TabularMLP(in_features, num_classes, hidden)
    if kind == "cnn":
        if len(input_shape) == 2:
            channels, size = 1, int(input_shape[-1])
        elif len(input_shape) == 3:
            channels, size = int(input_shape[0]), int(input_shape[-1])
        else:
            raise ValueError(f"cnn needs image inputs (H, W) or (C, H, W), got shape {tuple(input_shape)}")
        if width < 4 or width % 4:
            raise ValueError(f"cnn width must be a multiple of 4 (GroupNorm uses 4 groups), got {width}")
        return SmallCNN(channels, size, num_classes, width)
    raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(map(repr, MODEL_KINDS))}")
