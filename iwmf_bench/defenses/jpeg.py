"""JPEG compression as a purifier (Dziugaite et al. 2016; Guo et al. 2018).

Forward (``grad_mode`` ``none`` and ``bpda``): the real codec, what a deployed system
does. Each image is rounded to 8 bits, encoded by Pillow (libjpeg-turbo) at ``quality``
with 4:2:0 chroma subsampling (Pillow's default for RGB, passed explicitly so a change
of default cannot move the numbers), baseline, integer DCT, and decoded again. The
result equals Pillow's own encode/decode byte for byte.

Gradients. ``bpda``: the codec forward, the identity backward (Athalye et al. 2018).
``exact``: a differentiable JPEG in the style of Shin and Song (2017), whose forward
*approximates* the codec (see :func:`differentiable_jpeg`): full-range JFIF YCbCr,
4:2:0 by 2x2 averages, 8x8 DCT as matrix products, quantization with the IJG tables
scaled by quality exactly as libjpeg scales them, a smooth stand-in for rounding, and
libjpeg's "fancy" (triangular) chroma upsampling on decode. ``purify(...,
grad_mode="exact")`` therefore returns the *approximation*; every evaluation of the
benchmark runs the real codec. Mean absolute gap to the codec on the 40 shared faces
(160x160), in units of 1/255: 1.84 at quality 10, 0.89 at 30, 1.42 at 50, 0.55 at 75,
0.59 at 90 (bounds checked in tests/test_jpeg.py). The floor of about 0.5 is the
codec's integer arithmetic (it rounds every sample at each step; we keep real numbers);
above it, coefficients near a rounding boundary that the codec's integer DCT and our
real-valued one decide differently (common in faces that were JPEGs before).
"""

from __future__ import annotations

import io
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import BenchError
from .base import Defense, check_images

QUALITY_RANGE = (1, 95)  # Pillow's advice: above 95 the files grow with hardly any change

# The example tables of the JPEG standard (ITU-T T.81 Annex K.1 and K.2), row-major
# (natural order, not zigzag), the ones libjpeg scales by quality.
LUMINANCE_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMINANCE_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4


def check_quality(quality) -> int:
    lo, hi = QUALITY_RANGE
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not lo <= quality <= hi:
        raise BenchError(f"jpeg: quality must be an integer from {lo} to {hi} (Pillow's range; 75 is "
                         f"the usual setting), got {quality!r}")
    return int(quality)


def quantization_table(base, quality: int) -> torch.Tensor:
    """libjpeg's scaling of a base table by quality (``jpeg_set_quality`` with baseline
    forced, as Pillow calls it): percentage ``5000/q`` below 50 and ``200 - 2q`` from
    50, each entry ``(base * percentage + 50) // 100`` clamped to 1..255."""
    percent = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = (torch.tensor(base, dtype=torch.int64) * percent + 50) // 100
    return table.clamp(1, 255)


def codec(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The real codec: 8-bit rounding, Pillow JPEG encode (4:2:0) and decode, per image."""
    pixels = x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    decoded = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return decoded.to(device=x.device, dtype=x.dtype).div(255)


def smooth_round(x: torch.Tensor) -> torch.Tensor:
    """A rounding with a gradient: ``round(x) + d**3 + (3/8) (2d)**31``, ``d = x - round(x)``.

    Shin and Song's ``round(x) + d**3`` jumps by 3/4 at every half-integer (``d**3``
    goes from 1/8 to -1/8 there), so it is not differentiable, not even continuous,
    where a coefficient crosses a quantization boundary. The added odd term is below
    0.001 for ``|d| < 0.4`` and makes both sides meet at ``n + 1/2`` with the same slope
    (24), so the function is continuous and differentiable everywhere while staying
    close to Shin and Song's: mean gap to the codec at quality 10 on the shared faces
    1.8/255 against their 1.45/255 (``4 d**3``, the plain continuous cubic, gives 3.8).
    The slope is ``3 d**2`` away from the boundaries and peaks near them, where a small
    change of the image does flip the codec's rounding."""
    nearest = torch.round(x).detach()
    d = x - nearest
    return nearest + d ** 3 + 0.375 * (2 * d) ** 31


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II; ``D @ B @ D.T`` is JPEG's 2-D FDCT of a block."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * 0.5
    d[0] /= math.sqrt(2)
    return d.to(device=device, dtype=dtype)


def _compress_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Level shift, 8x8 DCT, smooth quantization, dequantization, IDCT, range limit of
    an (N, H, W) plane of samples in [0,255] with H, W multiples of 8."""
    n, h, w = plane.shape
    d = _dct_matrix(plane.dtype, plane.device)
    q = table.to(device=plane.device, dtype=plane.dtype)
    blocks = (plane - 128).reshape(n, h // 8, 8, w // 8, 8).transpose(2, 3)  # (N, by, bx, 8, 8)
    coefficients = d @ blocks @ d.T
    coefficients = smooth_round(coefficients / q) * q
    blocks = d.T @ coefficients @ d + 128
    # The decoder range-limits every sample of a component to 0..255 after the IDCT.
    return blocks.transpose(2, 3).reshape(n, h, w).clamp(0, 255)


def _fancy_upsample(chroma: torch.Tensor, axis: int) -> torch.Tensor:
    """Double one axis the way libjpeg's decoder does by default: each output sample is
    3/4 of the nearest input sample plus 1/4 of the next nearest (a triangular filter),
    the edge sample standing in for its missing neighbour."""
    first = chroma.narrow(axis, 0, 1)
    last = chroma.narrow(axis, chroma.shape[axis] - 1, 1)
    before = torch.cat([first, chroma.narrow(axis, 0, chroma.shape[axis] - 1)], axis)
    after = torch.cat([chroma.narrow(axis, 1, chroma.shape[axis] - 1), last], axis)
    even, odd = 0.75 * chroma + 0.25 * before, 0.75 * chroma + 0.25 * after
    shape = list(chroma.shape)
    shape[axis] *= 2
    return torch.stack([even, odd], axis + 1).reshape(shape)


def differentiable_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A differentiable approximation of :func:`codec` (Shin and Song 2017).

    The steps follow libjpeg: the image (values in [0,1], not rounded to 8 bits: that
    rounding has zero gradient on every 8-bit image) is scaled to 0..255 and its edge
    pixels replicated to whole 16x16 MCUs; RGB -> YCbCr (JFIF); Cb and Cr averaged over
    2x2; per 8x8 block: level shift, DCT, ``smooth_round(coefficient / Q) * Q`` with
    libjpeg's quality-scaled tables, IDCT, range limit; chroma cropped to its true size
    ``ceil(H/2) x ceil(W/2)`` and upsampled with the decoder's triangular filter (its
    box replication when the chroma is at most 2 samples wide, as libjpeg-turbo does);
    YCbCr -> RGB, clamp. Unlike the codec, intermediate samples stay real numbers; only
    the quantization of coefficients is rounded.
    """
    n, _, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    rgb = F.pad(x * 255, (0, pw, 0, ph), mode="replicate") if ph or pw else x * 255
    r, g, b = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    luma_table = quantization_table(LUMINANCE_TABLE, quality)
    chroma_table = quantization_table(CHROMINANCE_TABLE, quality)
    y = _compress_plane(y, luma_table)[:, :h, :w]
    ch, cw = (h + 1) // 2, (w + 1) // 2
    chroma = _compress_plane(chroma.flatten(0, 1), chroma_table).reshape(n, 2, *chroma.shape[2:])
    chroma = chroma[:, :, :ch, :cw]
    if cw > 2:
        chroma = _fancy_upsample(_fancy_upsample(chroma, 2), 3)
    else:
        chroma = chroma.repeat_interleave(2, 2).repeat_interleave(2, 3)
    cb, cr = (chroma[:, :, :h, :w] - 128).unbind(1)
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], 1)
    return rgb.clamp(0, 255) / 255


class JPEG(Defense):
    """JPEG compression at `quality` by the real codec (Dziugaite et al. 2016; Guo et al. 2018)."""

    registered_name = "jpeg"
    draws_in_one_call = True  # deterministic, image by image: one call is the loop
    stochastic = False
    grad_modes = ("none", "bpda", "exact")
    channels = 3

    def __init__(self, quality: int = 75):
        super().__init__()
        self.quality = check_quality(quality)

    def purify(self, x, generator=None, grad_mode="none"):
        """JPEG-compress ``x``. ``none`` and ``bpda`` return the real codec's output. With
        ``grad_mode="exact"`` the output is the differentiable JPEG's approximation of
        it (mean gap 0.5 to 1.9 / 255, see the module docstring), so that gradients flow;
        evaluations of the benchmark always use the real codec."""
        if grad_mode == "exact":
            check_images(x, "input to purify", self.channels)
            return differentiable_jpeg(x, self.quality)
        return super().purify(x, generator, grad_mode)

    def _purify(self, x, generator):
        return codec(x, self.quality)

    def config(self):
        return {"quality": self.quality}
