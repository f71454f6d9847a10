"""Bit-depth reduction, the first squeezer of feature squeezing (Xu, Evans and Qi,
"Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks", NDSS 2018).

Semantics. With ``L = 2**bits - 1`` levels above zero, every value becomes
``round(x * L) / L``: the nearest of the ``2**bits`` evenly spaced values
``0, 1/L, ..., 1`` (the paper's Section III-A: scale by ``2**i - 1``, round to integers,
scale back; its code rounds with ``numpy.rint``, half to even, as ``torch.round`` does).
On an 8-bit image ``v / 255`` this is ``q / L`` with the integer
``q = (2 * v * L + 255) // 510``: ``v * L / 255`` is never exactly half an integer
(``255`` is odd), so no tie is ever rounded and the float result is exact.

Gradients. The map is piecewise constant, so its true gradient is zero almost
everywhere (and undefined on the steps): useless to an attacker. Only ``bpda``
(identity backward, Athalye et al. 2018) is offered; there is no ``exact`` mode.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import BenchError
from .base import Defense


def reduce_bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``round(x * (2**bits - 1)) / (2**bits - 1)`` (values in [0,1] stay in [0,1])."""
    levels = float(2 ** bits - 1)
    return torch.round(x * levels) / levels


class BitDepth(Defense):
    """Bit-depth reduction to `bits` bits per channel (Xu et al. 2018, feature squeezing)."""

    registered_name = "bit-depth"
    draws_in_one_call = True  # deterministic, image by image: one call is the loop
    stochastic = False
    grad_modes = ("none", "bpda")  # the exact gradient is zero almost everywhere

    def __init__(self, bits: int = 5):
        super().__init__()
        whole = isinstance(bits, numbers.Real) and not isinstance(bits, bool) and math.isfinite(bits) \
            and bits == int(bits)
        if not whole or not 1 <= bits <= 8:
            raise BenchError(f"bit-depth: bits must be an integer from 1 to 8 (8 keeps 8-bit images "
                             f"unchanged; Xu et al. use 5 on ImageNet), got {bits!r}")
        self.bits = int(bits)

    def _purify(self, x, generator):
        return reduce_bit_depth(x, self.bits)

    def config(self):
        return {"bits": self.bits}
