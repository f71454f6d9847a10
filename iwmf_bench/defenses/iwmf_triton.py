"""IWMF on the GPU: one fused Triton kernel for the filter and its adjoint.

:mod:`.iwmf` runs this for CUDA tensors when Triton imports (it ships with torch's Linux
CUDA builds), and its dependency-level schedule in torch otherwise. The level schedule
needs a sequential scan of every window on the CPU and one gather/scatter per level from
index lists of 27 pixels per window: on a GPU it was slower per image than the CPU kernel.

Work split. One program per (image, channel) plane walks the image's window sequence in
chunks of ``CHUNK`` consecutive windows. Two consecutive windows rarely overlap (3x3
windows on a 160x160 image: 25 of 24,964 positions), so within a chunk the program finds
each window's level in registers (one more than the highest level of the chunk's earlier
windows it overlaps; earlier chunks are already applied) and applies the chunk level by
level: a level's windows are pairwise disjoint, so they are read, averaged and written
together, then a barrier makes the writes visible to the next level. Typically two levels
per chunk: the chain of dependent memory round trips is about ``2 n / CHUNK`` long
instead of ``n``, and the plane never leaves the GPU.

Equality with the CPU kernel. A window's mean reads exactly the values the sequential
definition reads (every earlier overlapping window is written before it), is accumulated
in float64 for float32 and float64 images (the CPU kernel's accumulator; float32 for half
precision), divided by ``s*s`` and rounded once to the image's dtype. Only the order of
the nine additions differs (a tree instead of row by row), and in float64 nine float32
values add exactly unless their magnitudes span more than 2**29: float32 results equal
the CPU kernel's bit for bit in practice (tests/test_iwmf_triton.py), float64 ones to a
few ulp.

Adjoint. ``A^T = W_1 ... W_n`` (see :mod:`.iwmf`): the same kernel walking the windows
from the last to the first (``reverse=True``).

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before
this module is imported) on CPU tensors: that is how the CPU tests check it.
"""

from __future__ import annotations

import sys

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means: no Triton here
    triton = None

#: Consecutive windows examined together (their pairwise overlaps live in registers).
CHUNK = 32
NUM_WARPS = 4
_failed: str | None = None  # the first launch error: Triton is then not used again


def available() -> bool:
    """Whether the Triton kernel can be used (Triton imports and has not failed to launch)."""
    return triton is not None and _failed is None


if triton is not None:

    @triton.jit
    def _iwmf_planes(img_ptr, win_ptr, n, channels, height, width,
                     S: tl.constexpr, AREA_P2: tl.constexpr, CHUNK: tl.constexpr,
                     REVERSE: tl.constexpr, ACC: tl.constexpr):
        plane = tl.program_id(0)  # image * channels + channel
        image = plane // channels
        base = img_ptr + plane.to(tl.int64) * height * width
        windows = win_ptr + image.to(tl.int64) * n * 2  # (n, 2) top-left corners, int32
        slot = tl.arange(0, CHUNK)
        pixel = tl.arange(0, AREA_P2)
        in_window = pixel < S * S
        d_row = pixel // S
        d_col = pixel % S
        for start in range(0, n, CHUNK):
            pos = start + slot
            valid = pos < n
            if REVERSE:
                k = n - 1 - pos
            else:
                k = pos
            k = tl.where(valid, k, 0)
            r0 = tl.load(windows + 2 * k, mask=valid, other=0)
            c0 = tl.load(windows + 2 * k + 1, mask=valid, other=0)
            # before[i, j]: window j comes earlier in the chunk than window i and overlaps it.
            before = (slot[None, :] < slot[:, None]) & valid[None, :] & valid[:, None]
            before = before & (tl.abs(r0[:, None] - r0[None, :]) < S) & (tl.abs(c0[:, None] - c0[None, :]) < S)
            # Longest chain of overlaps ending at each window: relax until nothing changes
            # (as many rounds as the chunk's longest chain, usually one or two).
            level = tl.zeros([CHUNK], dtype=tl.int32)
            changed = tl.sum(before.to(tl.int32), axis=1).to(tl.int32)
            changed = tl.max(changed, axis=0)
            while changed > 0:
                new = tl.max(tl.where(before, level[None, :] + 1, 0), axis=1)
                changed = tl.max((new != level).to(tl.int32), axis=0)
                level = new
            top = tl.max(tl.where(valid, level, 0), axis=0)
            offsets = (r0[:, None] + d_row[None, :]) * width + c0[:, None] + d_col[None, :]
            for lev in range(0, top + 1):
                mask = (valid & (level == lev))[:, None] & in_window[None, :]
                values = tl.load(base + offsets, mask=mask, other=0.0).to(ACC)
                mean = tl.sum(values, axis=1) / (S * S)
                out = tl.broadcast_to(mean[:, None], [CHUNK, AREA_P2]).to(img_ptr.dtype.element_ty)
                tl.store(base + offsets, out, mask=mask)
                tl.debug_barrier()  # this level's writes before the next level's reads


def apply_windows(x: torch.Tensor, top_left: torch.Tensor, s: int, reverse: bool = False) -> torch.Tensor:
    """``A x`` (``A^T x`` when ``reverse``) for top-left corners ``top_left`` (int32
    ``(B, n, 2)`` on ``x``'s device, in application order); no autograd, ``x`` untouched."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    out = x.detach().clone(memory_format=torch.contiguous_format)
    batch, channels, height, width = out.shape
    n = top_left.shape[1]
    if out.numel() == 0 or n == 0:
        return out
    if top_left.dtype != torch.int32 or top_left.shape != (batch, n, 2):
        raise ValueError(f"top_left must be int32 of shape ({batch}, n, 2), got {top_left.dtype} "
                         f"{tuple(top_left.shape)}")
    top_left = top_left.contiguous()
    acc = tl.float64 if out.dtype in (torch.float32, torch.float64) else tl.float32
    _iwmf_planes[(batch * channels,)](out, top_left, n, channels, height, width, S=s,
                                      AREA_P2=triton.next_power_of_2(s * s), CHUNK=CHUNK, REVERSE=reverse,
                                      ACC=acc, num_warps=NUM_WARPS)
    return out


def disable(error: BaseException) -> None:
    """Stop using Triton after a failed launch; say so once."""
    global _failed
    if _failed is None:
        _failed = f"{type(error).__name__}: {error}"
        print(f"iwmf: the Triton kernel failed ({_failed.splitlines()[0][:200]}); using the torch kernel",
              file=sys.stderr)
