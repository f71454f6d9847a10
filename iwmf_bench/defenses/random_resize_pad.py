"""Random resizing and padding (Xie, Wang, Zhang, Ren and Yuille, "Mitigating
Adversarial Effects Through Randomization", ICLR 2018).

Xie et al. resize a 299x299 image to ``rnd x rnd`` with ``rnd`` uniform in [299, 331),
then zero-pad it at a random position to 331x331 (``331 - rnd + 1`` possible offsets per
axis) and feed that to the network. Here the sizes are relative, so the defense works at
any input size, and the result is resized back to the input size (the contract: same
shape out; face models take a fixed input size).

Semantics, for an ``H x W`` input, per image:

1. the padded size is ``(round(r_max * H), round(r_max * W))``;
2. a height ``n`` is drawn uniformly from ``round(r_min * H) .. round(r_max * H) - 1``
   (upper bound exclusive, as Xie's [299, 331); when both ends round to the same value,
   ``n`` is that value), the width keeps the aspect ratio, ``round(n * W / H)``, at most
   the padded width;
3. the image is resized to ``n x width`` (bilinear, ``align_corners=False``);
4. it is placed at a uniformly drawn offset, top in ``0 .. padded_h - n`` and left in
   ``0 .. padded_w - width`` (both inclusive), on a canvas filled with ``pad_value``;
5. the canvas is resized back to ``H x W`` (bilinear).

``r_min=1.0, r_max=331/299`` is Xie's setting (sizes 160..176 padded to 177 for 160x160
faces). Xie's network took inputs in [-1, 1], so their zero padding is mid-grey, 0.5, in
the [0, 1] images this benchmark passes around (Athalye et al. 2018 pad with 0.5 too);
``pad_value`` defaults to that. Xie's released code resizes with nearest neighbour; we
resize bilinearly (differentiable almost everywhere, smoother for an attacker).

Randomness. Image ``i`` consumes the generator's numbers ``[3 i, 3 i + 3)`` (size, top,
left), so its result does not depend on the batch size, and a batch split into chunks
while carrying the generator gives the same images.

Gradients. For fixed draws the map is linear (interpolation weights and padding), and
built from differentiable torch ops, so ``exact`` gives the true gradient.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ..errors import BenchError
from .base import Defense

XIE_RATIO = 331 / 299


def draw_layouts(batch: int, height: int, width: int, r_min: float, r_max: float,
                 generator: torch.Generator) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The padded size and, per image, ``(resized_h, resized_w, top, left)``."""
    padded_h, padded_w = round(r_max * height), round(r_max * width)
    low = round(r_min * height)
    if low < 1:
        raise BenchError(f"random-resize-pad: r_min={r_min} resizes {height}x{width} images to nothing; "
                         "raise r_min")
    u = torch.rand((batch, 3), generator=generator, dtype=torch.float64, device=generator.device).cpu()
    layouts = []
    for size_u, top_u, left_u in u.tolist():
        span = padded_h - low  # number of sizes low .. padded_h - 1
        n = low + min(int(size_u * span), span - 1) if span > 0 else low
        m = min(max(1, round(n * width / height)), padded_w)
        top = min(int(top_u * (padded_h - n + 1)), padded_h - n)
        left = min(int(left_u * (padded_w - m + 1)), padded_w - m)
        layouts.append((n, m, top, left))
    return (padded_h, padded_w), layouts


def random_resize_pad(x: torch.Tensor, r_min: float = 1.0, r_max: float = XIE_RATIO,
                      pad_value: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Xie et al.'s randomization on the NCHW batch ``x`` (see the module docstring)."""
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh OS entropy; never touches the global RNG
    batch, _, height, width = x.shape
    (padded_h, padded_w), layouts = draw_layouts(batch, height, width, r_min, r_max, generator)
    out = []
    for image, (n, m, top, left) in zip(x.split(1), layouts):
        resized = F.interpolate(image, size=(n, m), mode="bilinear", align_corners=False)
        canvas = F.pad(resized, (left, padded_w - m - left, top, padded_h - n - top), value=pad_value)
        out.append(F.interpolate(canvas, size=(height, width), mode="bilinear", align_corners=False))
    return torch.cat(out) if out else x.clone()


class RandomResizePad(Defense):
    """Random resize to [r_min, r_max) x size and random padding, resized back (Xie et al. 2018)."""

    registered_name = "random-resize-pad"
    draws_in_one_call = True  # per-image randomness and computation: one call is the loop
    grad_modes = ("none", "bpda", "exact")

    def __init__(self, r_min: float = 1.0, r_max: float = XIE_RATIO, pad_value: float = 0.5):
        super().__init__()
        for name, value in (("r_min", r_min), ("r_max", r_max), ("pad_value", pad_value)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise BenchError(f"random-resize-pad: {name} must be a finite number, got {value!r}")
        if not r_min > 0:
            raise BenchError(f"random-resize-pad: r_min must be > 0 (a scale factor of the input size), got {r_min}")
        if r_min > r_max:
            raise BenchError(f"random-resize-pad: r_min ({r_min}) must not exceed r_max ({r_max}); "
                             f"Xie et al. use r_min=1.0, r_max={XIE_RATIO:.4f} (331/299)")
        if not 0 <= pad_value <= 1:
            raise BenchError(f"random-resize-pad: pad_value must lie in [0, 1], got {pad_value}")
        self.r_min, self.r_max, self.pad_value = float(r_min), float(r_max), float(pad_value)
        self.stochastic = self.r_min < self.r_max

    def _purify(self, x, generator):
        return random_resize_pad(x, self.r_min, self.r_max, self.pad_value, generator)

    def config(self):
        return {"r_min": self.r_min, "r_max": self.r_max, "pad_value": self.pad_value}
