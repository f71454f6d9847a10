"""The face model contract.

A face model maps images in [0,1] (float NCHW RGB) at its native square size to
embeddings. Its own input normalization lives inside ``forward`` (the paper's code fed
raw [0,1] pixels to models trained on other ranges; we do not). It declares

* ``input_size``: the side of the square input it expects,
* ``metric``: ``"cosine"`` (similarity, accept when >= threshold) or ``"euclidean"``
  (distance, accept when <= threshold),
* ``threshold``: its default verification threshold.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..defenses.base import check_images


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of an NCHW batch to ``size x size`` (no-op if equal)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def frozen(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.nn.Module:
    """A face model as the benchmark uses it: in eval mode with its parameters frozen (on
    ``device`` when given). Attacks differentiate with respect to the input only; gradients
    of the weights would nearly double the cost of every backward pass."""
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


class FaceModel(torch.nn.Module):
    """Base class of face recognition models (see the module docstring)."""

    input_size: ClassVar[int]
    metric: ClassVar[str]  # "cosine" or "euclidean"
    threshold: ClassVar[float]
    registered_name: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.registered_name or type(self).__name__.lower()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of images in [0,1], resized to the model's input size if needed."""
        check_images(x, f"input to {self.name}", channels=3)
        return self(resize(x, self.input_size))

    def config(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "metric": self.metric, "threshold": self.threshold}
