"""Iterative Window Mean Filter (Wang et al., TDSC 2024), exact and fast.

Semantics. ``n = int(lambda_0 * H * W)`` square windows of side ``s`` are applied one
after the other; each window is overwritten, per channel, by the mean of its current
values, so a later window reads what earlier ones wrote. A window is given by its
*centre* ``(row, col)``; it covers rows ``row - s//2 .. row - s//2 + s - 1`` (likewise
columns), i.e. the true centre for odd ``s``. Centres are drawn uniformly among the
positions where the window fits inside the image.

Speed. Applying thousands of windows one by one in Python is slow. Two windows that do
not overlap commute, so the sequence can be split into *dependency levels*: a window's
level is one more than the highest level of the earlier windows it overlaps. All
windows of one level are pairwise disjoint and are applied together with one gather
and one scatter; the levels are applied in order. This equals the sequential result
exactly (up to float rounding of the mean). The levels are found without a loop over
windows: at each round, a window is ready when it is the earliest remaining window in
its ``(2s-1) x (2s-1)`` neighbourhood of positions, which is a scatter-min over
positions followed by a min-pool. The number of rounds is the depth of the dependency
graph (about 10-20 for lambda_0 <= 0.5, s = 3), not the number of windows.

On CPU (float32/float64) the sequential definition itself, compiled with numba, is
faster still and is what runs. On CUDA tensors a fused Triton kernel runs when Triton
imports (:mod:`.iwmf_triton`: one program per image plane, dependency levels found per
chunk of consecutive windows in registers, no CPU scan); the levels in torch serve
everything else (no Triton, half precision on CPU).

Gradients. For fixed centres the filter is linear, ``A = W_n ... W_1``, and each window
map ``W_k`` (set the window to its mean) is a symmetric projection, so the adjoint is
``A^T = W_1 ... W_n``: the same windows in reverse order. A custom autograd Function
runs the forward kernel on the incoming gradient with the windows reversed (on GPU, the
levels in reverse), so forward plus backward costs about two forwards, and the backward
is differentiable again (double backward).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..errors import BenchError
from .base import Defense, draw_chunk


def draw_centres(batch: int, height: int, width: int, n: int, s: int,
                 generator: torch.Generator | None = None, shared: bool = False) -> torch.Tensor:
    """Draw window centres uniformly where an ``s x s`` window fits.

    Returns an int64 tensor of shape ``(n, 2)`` when ``shared`` (one sequence for the
    whole batch, as in the paper's reference code) or ``(batch, n, 2)`` otherwise.
    Image ``i`` consumes the generator's numbers ``[2 n i, 2 n (i+1))``, so splitting a
    batch into chunks while carrying the generator along gives identical results, and
    image ``i``'s windows never depend on the batch size.
    """
    if s < 1 or s > min(height, width):
        raise BenchError(f"window size s={s} must be between 1 and the image side ({height}x{width})")
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh OS entropy; never touches the global RNG
    rows = 1 if shared else batch
    u = torch.rand((rows, n, 2), generator=generator, dtype=torch.float64,
                   device=generator.device)
    span = torch.tensor([height - s + 1, width - s + 1], dtype=torch.float64, device=u.device)
    top_left = torch.floor(u * span).long().clamp_max_(span.long() - 1)
    centres = (top_left + s // 2).cpu()
    return centres[0] if shared else centres


def _top_left(centres: torch.Tensor, batch: int, height: int, width: int, s: int) -> np.ndarray:
    """Validate centres and return the windows' top-left corners as int32 (B, n, 2)."""
    if centres.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise BenchError(f"centres must be an integer tensor, got {centres.dtype}")
    if centres.dim() == 2:
        centres = centres.unsqueeze(0).expand(batch, -1, -1)
    if centres.dim() != 3 or centres.shape[0] != batch or centres.shape[-1] != 2:
        raise BenchError(f"centres must have shape (n, 2) or ({batch}, n, 2), got {tuple(centres.shape)}")
    tl = np.ascontiguousarray(centres.detach().cpu().numpy(), dtype=np.int32) - s // 2
    if tl.size and (tl.min() < 0 or tl[..., 0].max() > height - s or tl[..., 1].max() > width - s):
        raise BenchError(f"window centres must keep the {s}x{s} window inside the {height}x{width} image: "
                         f"rows in [{s // 2}, {height - s + s // 2}], cols in [{s // 2}, {width - s + s // 2}]")
    return tl


@numba.njit(cache=True, nogil=True)
def _scan_levels(top_left, height, width, s):  # pragma: no cover - compiled
    """Level of every window: one more than the highest level under it (height map)."""
    batch, n = top_left.shape[0], top_left.shape[1]
    levels = np.empty((batch, n), dtype=np.int64)
    height_map = np.empty((height, width), dtype=np.int64)
    for b in range(batch):
        height_map[:, :] = -1
        for k in range(n):
            r0, c0 = top_left[b, k, 0], top_left[b, k, 1]
            top = -1
            for i in range(r0, r0 + s):
                for j in range(c0, c0 + s):
                    top = max(top, height_map[i, j])
            top += 1
            levels[b, k] = top
            height_map[r0:r0 + s, c0:c0 + s] = top
    return levels


@numba.njit(cache=True, nogil=True)
def _gather_indices(top_left, levels, channels, height, width, s):  # pragma: no cover - compiled
    """Flat NCHW indices of every window's pixels, ordered by (level, window, channel,
    pixel), and the number of windows in each level."""
    batch, n = top_left.shape[0], top_left.shape[1]
    depth = levels.max() + 1
    counts = np.zeros(depth, dtype=np.int64)
    for b in range(batch):
        for k in range(n):
            counts[levels[b, k]] += 1
    start = np.zeros(depth, dtype=np.int64)  # first window slot of each level
    for level in range(1, depth):
        start[level] = start[level - 1] + counts[level - 1]
    per_window = channels * s * s
    index = np.empty(batch * n * per_window, dtype=np.int64)
    for b in range(batch):  # stable within a level: image-major, then sequence order
        for k in range(n):
            slot = start[levels[b, k]]
            start[levels[b, k]] += 1
            at = slot * per_window
            for c in range(channels):
                plane = (b * channels + c) * height * width
                for i in range(s):
                    row = plane + (top_left[b, k, 0] + i) * width + top_left[b, k, 1]
                    for j in range(s):
                        index[at] = row + j
                        at += 1
    return index, counts


@numba.njit(cache=True, nogil=True)
def _apply_in_order(images, top_left, s):  # pragma: no cover - compiled
    """The definition itself, compiled: windows one after the other, in place."""
    batch, channels = images.shape[0], images.shape[1]
    n = top_left.shape[1]
    area = s * s
    for b in range(batch):
        for k in range(n):
            r0, c0 = top_left[b, k, 0], top_left[b, k, 1]
            for c in range(channels):
                total = 0.0  # float64 accumulator
                for i in range(r0, r0 + s):
                    for j in range(c0, c0 + s):
                        total += images[b, c, i, j]
                mean = total / area
                for i in range(r0, r0 + s):
                    for j in range(c0, c0 + s):
                        images[b, c, i, j] = mean


def dependency_levels(centres: torch.Tensor, height: int, width: int, s: int) -> torch.Tensor:
    """Level of each window, shape ``(B, n)`` (centres as in :func:`iwmf_apply`).

    Windows of one level are pairwise disjoint and depend only on windows of lower
    levels. One pass over the windows with a per-pixel "height map" (the level of the
    last window that wrote each pixel): a window's level is one more than the highest
    value under it. This integer scan is inherently sequential, so it is compiled
    (numba, about a millisecond for 60k windows); the floating-point work stays in torch
    on the image's device.
    """
    batch = centres.shape[0] if centres.dim() == 3 else 1
    return torch.from_numpy(_scan_levels(_top_left(centres, batch, height, width, s), height, width, s))


def _level_groups(tl: np.ndarray, shape: tuple[int, ...], s: int, device: torch.device) -> list[torch.Tensor]:
    """Flat NCHW pixel indices of each dependency level's windows, in level order."""
    _, channels, height, width = shape
    levels = _scan_levels(tl, height, width, s)
    index, counts = _gather_indices(tl, levels, channels, height, width, s)
    return list(torch.from_numpy(index).to(device).split((counts * channels * s * s).tolist()))


def _mean_level(flat: torch.Tensor, idx: torch.Tensor, area: int) -> torch.Tensor:
    """The per-(window, channel) means of one level's disjoint windows, one per pixel."""
    m = idx.numel() // area
    return flat.index_select(0, idx).view(m, area).mean(dim=1, keepdim=True).expand(m, area).reshape(-1)


def _apply_by_levels_autograd(x: torch.Tensor, tl: np.ndarray, s: int) -> torch.Tensor:
    """The dependency-level schedule built from differentiable gathers and out-of-place
    scatters, so autograd records every level (slow backward). Kept as the independent
    reference for the gradients of :class:`_WindowSequence` (tests)."""
    flat = x.reshape(-1)
    for idx in _level_groups(tl, tuple(x.shape), s, x.device):
        flat = flat.index_put((idx,), _mean_level(flat, idx, s * s))
    return flat.view(x.shape)


class _Windows:
    """One window sequence bound to an image shape, applicable forwards or backwards.

    Forwards is the filter ``A = W_n ... W_1``. Every window map ``W_k`` (replace the
    window's pixels by their mean) is an orthogonal projection, hence symmetric, so
    ``A^T = W_1 ... W_n``: the same windows in reverse order. That is the whole backward.
    """

    def __init__(self, tl: np.ndarray, s: int, shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype, compiled: bool | None = None, kernel: str | None = None):
        self.tl, self.s, self.shape = tl, s, shape
        # CPU float32/float64: the sequential definition, compiled ("numba"), beats any
        # schedule. CUDA: the fused Triton kernel ("triton") when Triton imports. Elsewhere:
        # dependency levels in torch ("levels"), one gather/scatter each. (``compiled=False``
        # or ``kernel=...`` forces one: tests check every schedule on CPU.)
        if kernel is None and compiled is not None:
            kernel = "numba" if compiled else "levels"
        if kernel is None:
            kernel = _default_kernel(device, dtype)
        if kernel not in KERNELS:
            raise BenchError(f"iwmf kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "numba" and not (device.type == "cpu" and dtype in (torch.float32, torch.float64)):
            raise BenchError(f"iwmf kernel 'numba' runs on CPU float32/float64 images, not {device.type} {dtype}")
        self.kernel = kernel
        self.compiled = kernel == "numba"
        self.device = device
        self._tl_reversed: np.ndarray | None = None
        self._tl_device: torch.Tensor | None = None
        self._groups: list[torch.Tensor] | None = None

    def apply(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``A x`` (or ``A^T x`` when ``reverse``) without autograd; ``x`` is untouched."""
        if self.kernel == "triton":
            from . import iwmf_triton  # deferred: Triton is optional and slow to import

            if self._tl_device is None:
                self._tl_device = torch.from_numpy(self.tl).to(self.device)
            try:
                return iwmf_triton.apply_windows(x, self._tl_device, self.s, reverse)
            except Exception as exc:  # noqa: BLE001 - e.g. a GPU this Triton cannot compile for
                if x.device.type != "cuda":
                    raise
                iwmf_triton.disable(exc)  # one line, then the torch kernel from now on
                self.kernel = "levels"
        # A fresh C-contiguous copy: the kernels write in place and index NCHW memory.
        out = x.detach().clone(memory_format=torch.contiguous_format)
        if self.compiled:
            if reverse and self._tl_reversed is None:
                self._tl_reversed = np.ascontiguousarray(self.tl[:, ::-1])
            _apply_in_order(out.numpy(), self._tl_reversed if reverse else self.tl, self.s)
            return out
        if self._groups is None:
            self._groups = _level_groups(self.tl, self.shape, self.s, self.device)
        flat = out.view(-1)
        for idx in (reversed(self._groups) if reverse else self._groups):
            # Disjoint windows commute, so a level is one symmetric map: A^T runs the
            # same levels in reverse order.
            flat.index_put_((idx,), _mean_level(flat, idx, self.s * self.s))
        return out


KERNELS = ("numba", "levels", "triton")


def _default_kernel(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        return "numba"
    if device.type == "cuda":
        from . import iwmf_triton  # deferred: Triton is optional and slow to import

        if iwmf_triton.available():
            return "triton"
    return "levels"


class _WindowSequence(torch.autograd.Function):
    """``A x`` with backward ``A^T g``: the same fast kernel on the windows reversed.

    The backward calls this Function again (with the direction flipped), so it is itself
    differentiable: double backward (``create_graph=True``, Hessian-vector products) works.
    """

    @staticmethod
    def forward(ctx, x, windows, reverse):
        ctx.windows, ctx.reverse = windows, reverse
        return windows.apply(x, reverse)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _WindowSequence.apply(grad, ctx.windows, not ctx.reverse), None, None


def iwmf_apply(x: torch.Tensor, centres: torch.Tensor, s: int = 3, *, kernel: str | None = None) -> torch.Tensor:
    """Apply an explicit window sequence to ``x`` (NCHW).

    ``centres``: integer tensor ``(n, 2)`` shared by the batch or ``(B, n, 2)`` one
    sequence per image, in application order. Equals applying the windows one by one.
    Differentiable (exact gradients, computed by the same kernel on the windows in
    reverse order, so a backward costs about one forward); ``x`` is not modified.
    ``kernel``: ``"numba"`` (CPU), ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)
    or ``"levels"`` (torch, any device); None picks the fastest for ``x`` (benchmarks
    compare them).
    """
    if x.dim() != 4:
        raise BenchError(f"iwmf expects a 4-D NCHW batch, got shape {tuple(x.shape)}")
    batch, _, height, width = x.shape
    tl = _top_left(centres, batch, height, width, s)
    if tl.shape[1] == 0 or batch == 0:
        return x.clone()
    windows = _Windows(tl, s, tuple(x.shape), x.device, x.dtype, kernel=kernel)
    if x.requires_grad and torch.is_grad_enabled():
        return _WindowSequence.apply(x, windows, False)
    return windows.apply(x)


def iwmf(x: torch.Tensor, lambda_0: float, s: int = 3, generator: torch.Generator | None = None,
         shared: bool = False) -> torch.Tensor:
    """IWMF with ``int(lambda_0 * H * W)`` random windows drawn from ``generator``.

    By default every image gets its own window sequence (its result does not depend on
    the rest of the batch); ``shared=True`` uses one sequence for the whole batch, as
    the paper's reference code does.
    """
    if x.dim() != 4:
        raise BenchError(f"iwmf expects a 4-D NCHW batch, got shape {tuple(x.shape)}")
    if not (lambda_0 >= 0):
        raise BenchError(f"lambda_0 must be >= 0, got {lambda_0}")
    batch, _, height, width = x.shape
    n = int(lambda_0 * height * width)
    centres = draw_centres(batch, height, width, n, s, generator, shared)
    return iwmf_apply(x, centres, s)


class IWMF(Defense):
    """Iterative Window Mean Filter: lambda_0*H*W random s x s windows, each set to its mean."""

    registered_name = "iwmf"
    stochastic = True
    grad_modes = ("none", "bpda", "exact")

    def __init__(self, lambda_0: float = 0.25, s: int = 3, shared: bool = False):
        super().__init__()
        if not (lambda_0 >= 0):
            raise BenchError(f"lambda_0 must be >= 0, got {lambda_0}")
        if int(s) != s or s < 1:
            raise BenchError(f"window size s must be a positive integer, got {s}")
        self.lambda_0, self.s, self.shared = float(lambda_0), int(s), bool(shared)
        self.stochastic = self.lambda_0 > 0

    def _purify(self, x, generator):
        return iwmf(x, self.lambda_0, self.s, generator, self.shared)

    def purify_draws(self, x, generator=None, draws=1, grad_mode="none"):
        """All draws in one kernel call, with the loop's windows (see :meth:`Defense.purify_draws`).

        Per-image sequences: image ``i`` of a call consumes the generator's numbers
        ``[2 n i, 2 n (i+1))`` whatever the batch, so one call on the stacked draws *is*
        the loop. Shared sequences: the loop draws one sequence per call, so draw them in
        that order, one per draw, and give each draw's chunk its own.
        """
        chunk = draw_chunk(x, draws)
        if draws == 1 or not self.shared:
            return self.purify(x, generator, grad_mode)
        if x.dim() != 4:
            raise BenchError(f"iwmf expects a 4-D NCHW batch, got shape {tuple(x.shape)}")
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh OS entropy; never touches the global RNG
        height, width = x.shape[-2:]
        n = int(self.lambda_0 * height * width)
        centres = torch.cat([draw_centres(chunk, height, width, n, self.s, generator, shared=True)
                             .expand(chunk, n, 2) for _ in range(draws)])
        return self._with_grad_mode(x, grad_mode, lambda images: iwmf_apply(images, centres, self.s))

    def config(self):
        return {"lambda_0": self.lambda_0, "s": self.s, "shared": self.shared}
