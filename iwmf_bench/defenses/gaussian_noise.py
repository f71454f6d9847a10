"""Additive Gaussian input noise, the randomization of randomized smoothing (Lecuyer et
al., S&P 2019; Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019), used here as a one-draw purifier: no majority vote
over many draws and no certificate, only the noise.

Semantics. ``clamp(x + sigma * z, 0, 1)`` with ``z`` standard normal, independent per
pixel and channel; ``sigma`` is in units of the [0, 1] pixel range, as Cohen et al.'s
sigma in {0.12, 0.25, 0.5, 1.0}. ``sigma = 0`` is the identity: not stochastic, and it
draws nothing.

Randomness. The noise is drawn image by image, in float32 on the generator's device
(then cast to the input's dtype and device), so image ``i`` uses the generator's
``i``-th draw whatever the batch size: a batch split into chunks while carrying the
generator gives the same images, and float32 and float64 inputs get the same noise.

Gradients. For a fixed draw the map is the identity plus a constant, then a clamp, so
``exact`` gives the true gradient: 1 where the noisy value lies inside [0, 1], 0 where
the clamp cuts it.
"""

from __future__ import annotations

import numbers

import torch

from ..errors import BenchError
from .base import Defense


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``clamp(x + sigma * N(0, 1), 0, 1)`` on the NCHW batch ``x`` (see the module docstring)."""
    if sigma == 0:
        return x.clone()
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh OS entropy; never touches the global RNG
    # One draw per image: CPU randn fills long tensors in blocks whose tail depends on the
    # total length, so a single draw for the whole batch would depend on the batch size.
    noise = torch.stack([torch.randn(x.shape[1:], generator=generator, device=generator.device)
                         for _ in range(x.shape[0])]) if x.shape[0] else torch.zeros(x.shape)
    return (x + sigma * noise.to(device=x.device, dtype=x.dtype)).clamp(0, 1)


class GaussianNoise(Defense):
    """Additive Gaussian noise of std sigma, clamped to [0,1] (randomized-smoothing style)."""

    registered_name = "gaussian-noise"
    draws_in_one_call = True  # per-image randomness and computation: one call is the loop
    grad_modes = ("none", "bpda", "exact")

    def __init__(self, sigma: float = 0.12):
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma >= 0 \
                or sigma == float("inf"):
            raise BenchError(f"gaussian-noise: sigma must be a finite number >= 0 (the noise std in units "
                             f"of the [0,1] pixel range, e.g. 0.12 or 0.25), got {sigma!r}")
        self.sigma = float(sigma)
        self.stochastic = self.sigma > 0

    def _purify(self, x, generator):
        return gaussian_noise(x, self.sigma, generator)

    def config(self):
        return {"sigma": self.sigma}
