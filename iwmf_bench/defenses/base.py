"""The defense contract.

A defense maps a batch of images in [0,1] (float NCHW RGB) to purified images of the
same shape. It declares

* ``stochastic``: whether its output depends on randomness. All randomness comes from
  the ``torch.Generator`` passed to :meth:`Defense.purify`, never from global RNG state,
  so a run is reproducible from its seed.
* ``grad_modes``: how an adaptive attacker may differentiate through it:
  ``"exact"`` (backpropagate through the real computation), ``"bpda"`` (forward pass
  of the defense, identity in the backward pass; Athalye et al. 2018), or only
  ``"none"`` (no gradient).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import BenchError

GRAD_MODES = ("none", "bpda", "exact")


def check_images(x: torch.Tensor, what: str = "images", channels: int | None = None) -> None:
    """Raise a clear error unless ``x`` is a finite float NCHW batch with values in [0,1]
    (and ``channels`` channels, when given)."""
    if not isinstance(x, torch.Tensor):
        raise BenchError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise BenchError(f"{what}: expected a 4-D NCHW batch, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        hint = " (grayscale: repeat it, x.expand(-1, 3, -1, -1))" if channels == 3 and x.shape[1] == 1 else ""
        raise BenchError(f"{what}: expected {channels} channels (NCHW), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise BenchError(f"{what}: expected floating point values in [0,1], got dtype {x.dtype} "
                         "(divide uint8 images by 255)")
    if x.numel() == 0:
        return
    with torch.no_grad():
        lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; NaN or inf shows up here
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = ~torch.isfinite(x)
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise BenchError(f"{what}: contains {int(bad.sum())} NaN or infinite value(s), the first at "
                             f"(image, channel, row, col) = {first}")
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise BenchError(f"{what}: values must lie in [0,1], found range [{lo:.4g}, {hi:.4g}] "
                         "(images in [-1,1] or [0,255] must be rescaled first)")


class Defense(torch.nn.Module):
    """Base class of purification defenses (see the module docstring for the contract)."""

    stochastic: ClassVar[bool] = False
    grad_modes: ClassVar[tuple[str, ...]] = ("none", "bpda", "exact")
    channels: int | None = None  # channels the defense needs (None: any)

    def _purify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None,
               grad_mode: str = "none") -> torch.Tensor:
        """Purify ``x`` (values in [0,1]); ``grad_mode`` says how gradients pass."""
        if grad_mode not in GRAD_MODES:
            raise BenchError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if grad_mode != "none" and grad_mode not in self.grad_modes:
            raise BenchError(f"defense {self.name!r} does not support grad_mode {grad_mode!r} "
                             f"(supported: {', '.join(self.grad_modes)})")
        check_images(x, "input to purify", self.channels)
        if grad_mode == "exact":
            return self._purify(x, generator)
        with torch.no_grad():
            out = self._purify(x.detach(), generator)
        if grad_mode == "bpda":
            # Forward: the purified image. Backward: identity (straight-through).
            return x + (out - x).detach()
        return out

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.purify(x, generator)

    @property
    def name(self) -> str:
        return getattr(self, "registered_name", type(self).__name__.lower())

    def config(self) -> dict[str, Any]:
        """Parameters that identify this defense in results (hashing, leaderboards)."""
        return {}


class NoDefense(Defense):
    """No purification: the identity (baseline row of every leaderboard)."""

    registered_name = "none"
    stochastic = False

    def _purify(self, x, generator):
        return x
