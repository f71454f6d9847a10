"""Median smoothing, the local-smoothing squeezer of feature squeezing (Xu, Evans and Qi,
"Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks", NDSS 2018).

Semantics. Each pixel of each channel becomes the median of the ``k x k`` window centred
on it (``k`` odd, so the window has a true centre and the median of its ``k*k`` values is
one of them: no averaging of two middle values). Borders use scipy's ``'reflect'`` mode
(``d c b a | a b c d | d c b a``: the edge pixel is repeated), the mode of the paper's
code (``scipy.ndimage.median_filter(x, size=(1, k, k, 1), mode='reflect')``), so this
equals ``scipy.ndimage.median_filter(x, size=(1, 1, k, k), mode='reflect')`` on NCHW
batches. Xu et al. also report 2x2 windows, whose "centre" is off by half a pixel; they
are not offered here.

Gradients. The median selects one input pixel per output pixel, so the filter is
piecewise linear with a 0/1 Jacobian: the output is a gather of the selected pixels
(found by ``torch.median``'s indices), and ``exact`` backpropagates through that gather.
Ties between equal values send the gradient to one of them.

Memory. The ``k*k`` window values of every pixel are materialized, ``k*k`` times the
image; planes are processed in chunks of at most about 64 MiB of window values.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import BenchError
from .base import Defense

_CHUNK_BYTES = 64 * 2 ** 20


def reflect_index(n: int, pad: int, device=None) -> torch.Tensor:
    """Indices of ``pad`` extra positions on each side of ``0..n-1`` in scipy's
    ``'reflect'`` mode (half-sample symmetric, repeated for pads wider than ``n``)."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


# A median-of-9 selection network (Paeth's, as popularised by Devillard's "Fast median
# search"): 19 compare-exchanges of whole tensors leave the median in position 4.
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


@torch.no_grad()
def median3_values(x: torch.Tensor) -> torch.Tensor:
    """3x3 median values of the NCHW batch ``x`` ('reflect' borders) by the selection network
    on the nine shifted views: the same values as :func:`median_filter`, several times faster,
    but without the selected pixels' indices, so only for passes without autograd."""
    height, width = x.shape[-2:]
    padded = x.index_select(-2, reflect_index(height, 1, x.device)).index_select(-1, reflect_index(width, 1, x.device))
    v = [padded[..., i:i + height, j:j + width] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4].contiguous()


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` median of every channel of the NCHW batch ``x`` (``k`` odd), borders in
    scipy's ``'reflect'`` mode. Differentiable (gradient to the selected pixel)."""
    if k == 1:
        return x.clone()
    if k == 3 and not (torch.is_grad_enabled() and x.requires_grad):
        return median3_values(x)  # inference and black-box queries: no indices needed
    batch, channels, height, width = x.shape
    planes = x.reshape(batch * channels, height * width)
    # Find which input pixel each output selects (no autograd: the window copies are big),
    # then gather those pixels: the backward pass is one scatter-add, not a pass through
    # the k*k window copies.
    source = median_sources(planes.detach().reshape(-1, height, width), k)
    return planes.gather(1, source.view(batch * channels, -1)).view(batch, channels, height, width)


@torch.no_grad()
def median_sources(planes: torch.Tensor, k: int) -> torch.Tensor:
    """Flat index (``row * W + col``) of the input pixel that is the median of each
    pixel's ``k x k`` window, for ``(P, H, W)`` planes; shape ``(P, H, W)``."""
    _, height, width = planes.shape
    rows = reflect_index(height, k // 2, planes.device)
    cols = reflect_index(width, k // 2, planes.device)
    padded = planes.index_select(1, rows).index_select(2, cols)
    step = max(1, _CHUNK_BYTES // (height * width * k * k * planes.element_size()))
    picks = []
    for chunk in padded.split(step):
        # (p, H+2r, W+2r) -> view (p, H, W, k, k) -> copy (p, H, W, k*k) -> position in window.
        windows = chunk.unfold(1, k, 1).unfold(2, k, 1).reshape(chunk.shape[0], height, width, k * k)
        picks.append(windows.median(dim=-1).indices)
    pick = torch.cat(picks)
    source_row = rows[torch.arange(height, device=planes.device).view(-1, 1) + pick // k]
    source_col = cols[torch.arange(width, device=planes.device) + pick % k]
    return source_row * width + source_col


class Median(Defense):
    """Median smoothing over k x k windows, scipy 'reflect' borders (Xu et al. 2018)."""

    registered_name = "median"
    draws_in_one_call = True  # deterministic, image by image: one call is the loop
    stochastic = False
    grad_modes = ("none", "bpda", "exact")

    def __init__(self, k: int = 3):
        super().__init__()
        whole = isinstance(k, numbers.Real) and not isinstance(k, bool) and math.isfinite(k) and k == int(k)
        if not whole or k < 1 or k % 2 == 0:
            raise BenchError(f"median: window k must be an odd positive integer (the k x k window is "
                             f"centred on its pixel), got {k!r}; use e.g. k=3 or k=5")
        self.k = int(k)

    def _purify(self, x, generator):
        return median_filter(x, self.k)

    def config(self):
        return {"k": self.k}
