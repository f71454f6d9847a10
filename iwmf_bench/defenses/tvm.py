"""Total-variation minimization with random pixel dropout (Guo et al., ICLR 2018).

Semantics. Every pixel of every channel is kept independently with probability
``keep`` (a Bernoulli mask ``M``, drawn per image from the explicit generator); the
dropped pixels are forgotten and the image is rebuilt from the kept ones by solving,
per image and channel,

    min_z  1/2 ||M * (z - x)||^2  +  lam * sum_pixels sqrt(dx(z)^2 + dy(z)^2 + eps^2)

with forward differences ``dx, dy`` (zero across the last column / row, i.e. Neumann
boundaries). This is *isotropic* TV (the two differences of a pixel share one norm),
as in the authors' code, which solved it with a masked split-Bregman solver
(github.com/facebookarchive/adversarial_image_defenses, lib/transformations/tvm.py:
``PIXEL_DROP_RATE = 0.5``, ``TVM_WEIGHT = 0.03``, an independent drop per channel and
pixel, images in [0,1]). Their solver (scikit-image's split Bregman with fidelity
weight ``1/TVM_WEIGHT``) minimises ``TV(z) + 1/(2*0.03) ||M(z-x)||^2``, which is the
objective above with ``lam = 0.03`` (multiply by 0.03); hence the 1/2 and the defaults
``keep = 0.5``, ``lam = 0.03``. The paper writes the fidelity as an unsquared norm; we
follow the code that produced its numbers.

Smoothing. The TV norm ``|g|`` is replaced by ``sqrt(|g|^2 + eps^2)`` (``eps = 0.01``,
2.55/255: differences above a few grey levels are penalised as by TV, so an 8/255
perturbation is still flattened). This makes the objective smooth, so a plain gradient
scheme applies, and makes the unrolled solver a smooth function of ``x`` (the exact
``|g|`` has a kink wherever a difference vanishes, which flat image regions hit all the
time): ``exact`` gradients are then true derivatives, not a choice among subgradients.
The objective is strictly convex whenever a channel keeps at least one pixel, so its
minimiser is unique, lies in [0,1] for inputs in [0,1] (clipping lowers both terms),
and does not depend on the values of the dropped pixels.

Solver. FISTA (Nesterov's accelerated gradient, Beck & Teboulle 2009) with the constant
step ``1/L``, ``L = 1 + 8 lam / eps`` (the gradient's Lipschitz constant: ``||M|| <= 1``
and ``||grad||^2 <= 8``), for a fixed number of ``iterations``, with the classical
momentum schedule ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``. Chosen over Chambolle-Pock
because every operation is smooth (a primal-dual method projects onto the TV ball, a
kink), over split Bregman because it has no inner Gauss-Seidel sweep (sequential,
slow in torch), and because its cost per iteration is one gradient (a few image-sized
element-wise operations), on any device. The start point holds no information about
the dropped pixels either: kept pixels as they are, each dropped pixel the mean of the
kept pixels of its 3x3 neighbourhood (of its channel when none is kept). On the shared
160x160 faces with the defaults, 100 iterations reach a relative objective gap of about
1e-5 and a mean distance of 0.03/255 to a 3000-iteration run (tests/test_tvm.py checks
this against a reference minimiser), so the default is 100 iterations. The output is
clamped to [0,1] (the minimiser lies there; unconverged iterates may overshoot by a
hair).

Speed. On CPU (float32/float64) the iterations run compiled (numba): each (image,
channel) plane is solved by one thread in cache, all iterations in one call, planes in
parallel; about 4x faster than the same iterations as torch operations (which serve the
GPU and half precision, and equal the compiled solver to float64 rounding: tests).

Gradients. ``exact`` differentiates through the unrolled iterations. Compiled: the
backward recomputes a plane's iterates and runs the adjoint recursion of the iterations
written out (:func:`_fista_planes_backward`; memory: one plane per iteration per thread);
it is differentiable once. As torch operations, the iterations run in blocks of about
``sqrt(iterations)`` under activation checkpointing, so autograd keeps two images per
block plus one block's activations while it recomputes it, instead of every iteration's
activations. ``bpda`` is the straight-through approximation (Athalye et al. 2018 used
BPDA against exactly this defense).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import BenchError
from .base import Defense

EPS = 0.01  # TV smoothing (see the module docstring)


def draw_keep_mask(batch: int, shape: tuple[int, int, int], keep: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(keep) mask of shape ``(batch, *shape)`` (bool, on the generator's device).

    Image ``i`` consumes the generator's numbers ``[n i, n (i+1))`` with ``n = C*H*W``
    (one draw per image), so splitting a batch into chunks while carrying the generator
    gives identical masks, and image ``i``'s mask never depends on the batch size.
    """
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh OS entropy; never touches the global RNG
    draws = [torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
             for _ in range(batch)]
    if not draws:
        return torch.zeros((0, *shape), dtype=torch.bool, device=generator.device)
    return torch.stack(draws) < keep


def _differences(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along columns and rows, zero in the last column / row."""
    dx = F.pad(z[..., :, 1:] - z[..., :, :-1], (0, 1))
    dy = F.pad(z[..., 1:, :] - z[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def _differences_adjoint(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_differences` (minus the divergence); ignores the last column of
    ``px`` and the last row of ``py``, which the differences never fill."""
    px, py = px[..., :, :-1], py[..., :-1, :]
    return F.pad(px, (1, 0)) - F.pad(px, (0, 1)) + F.pad(py, (0, 0, 1, 0)) - F.pad(py, (0, 0, 0, 1))


def tv_objective(z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, lam: float,
                 eps: float = EPS) -> torch.Tensor:
    """The objective of the module docstring, summed per image: shape ``(B,)``."""
    dx, dy = _differences(z)
    fidelity = 0.5 * (mask * (z - x) ** 2).sum(dim=(1, 2, 3))
    return fidelity + lam * torch.sqrt(dx * dx + dy * dy + eps * eps).sum(dim=(1, 2, 3))


def tv_objective_gradient(z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, lam: float,
                          eps: float = EPS) -> torch.Tensor:
    """Gradient of :func:`tv_objective` with respect to ``z`` (written out: cheaper than autograd)."""
    dx, dy = _differences(z)
    inv_norm = torch.rsqrt(dx * dx + dy * dy + eps * eps)
    return mask * (z - x) + lam * _differences_adjoint(dx * inv_norm, dy * inv_norm)


def _start_point(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept pixels as they are; a dropped pixel gets the mean of the kept pixels of its
    3x3 neighbourhood (the channel's kept mean when there are none). Independent of the
    dropped pixels' values."""
    channels = x.shape[1]
    box = torch.ones(channels, 1, 3, 3, dtype=x.dtype, device=x.device)
    kept = mask * x
    total = F.conv2d(F.pad(kept, (1, 1, 1, 1)), box, groups=channels)
    count = F.conv2d(F.pad(mask, (1, 1, 1, 1)), box, groups=channels)
    channel_mean = kept.sum(dim=(2, 3), keepdim=True) / mask.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    fill = torch.where(count > 0, total / count.clamp_min(1), channel_mean)
    return kept + (1 - mask) * fill


def _momentum_schedule(iterations: int) -> list[float]:
    """FISTA's extrapolation weights ``(t_k - 1) / t_{k+1}``, one per iteration."""
    weights, t = [], 1.0
    for _ in range(iterations):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        weights.append((t - 1.0) / t_next)
        t = t_next
    return weights


def _fista_block(z, y, x, mask, momenta, lam, eps, step):
    """A few FISTA iterations; a pure function of its tensors, so checkpoint
    recomputation repeats it exactly."""
    for beta in momenta:
        z_next = y - step * tv_objective_gradient(y, x, mask, lam, eps)
        y = z_next + beta * (z_next - z)
        z = z_next
    return z, y


# --- The compiled CPU solver -------------------------------------------------------------
# Every (image, channel) plane is an independent problem of a few tens of kilobytes, so one
# thread solves a whole plane in cache, all iterations at once (numba, planes in parallel),
# instead of some thirty image-sized element-wise passes through memory per iteration. The
# backward recomputes a plane's iterates and runs the adjoint recursion of the unrolled
# iterations (see :class:`_CompiledFista`); its memory is one plane per iteration per thread.


@numba.njit(cache=True, nogil=True)
def _plane_flux(y, v, eps2, wx, wy):  # pragma: no cover - compiled
    """Per pixel, with ``g`` the forward differences of ``y`` and ``n = sqrt(|g|^2 + eps^2)``:
    ``w = g / n`` (the TV gradient's flux) when ``v`` is None, else the derivative of
    ``g / n`` along the differences ``u`` of ``v``: ``u / n - g (g . u) / n^3``.

    ``wx`` is (H, W+1) and ``wy`` (H+1, W): pixel (i, j)'s values go to ``wx[i, j+1]`` and
    ``wy[i+1, j]``; column 0 of ``wx`` and row 0 of ``wy`` stay zero, and so do the last
    column / row of the flux (the differences vanish there), so :func:`_adjoint_at` needs
    no branch."""
    height, width = y.shape
    for i in range(height):
        last_row = i == height - 1
        for j in range(width):
            gx = y[i, j + 1] - y[i, j] if j < width - 1 else 0.0
            gy = 0.0 if last_row else y[i + 1, j] - y[i, j]
            inv = 1.0 / np.sqrt(gx * gx + gy * gy + eps2)
            if v is None:
                wx[i, j + 1] = gx * inv
                wy[i + 1, j] = gy * inv
            else:
                ux = v[i, j + 1] - v[i, j] if j < width - 1 else 0.0
                uy = 0.0 if last_row else v[i + 1, j] - v[i, j]
                dot = (gx * ux + gy * uy) * inv * inv * inv
                wx[i, j + 1] = ux * inv - gx * dot
                wy[i + 1, j] = uy * inv - gy * dot


@numba.njit(cache=True, nogil=True, inline="always")
def _adjoint_at(wx, wy, i, j):  # pragma: no cover - compiled
    """``D^T w`` at pixel (i, j) (see :func:`_differences_adjoint`), on the padded flux."""
    return wx[i, j] - wx[i, j + 1] + wy[i, j] - wy[i + 1, j]


@numba.njit(cache=True, nogil=True)
def _zero_flux(height, width, dtype_like):  # pragma: no cover - compiled
    """The padded flux buffers of :func:`_plane_flux`, zero, in ``dtype_like``'s dtype."""
    return (np.zeros((height, width + 1), dtype_like.dtype), np.zeros((height + 1, width), dtype_like.dtype))


@numba.njit(cache=True, nogil=True)
def _plane_solve(x, m, z, y, momenta, lam, eps2, step, wx, wy, history):  # pragma: no cover - compiled
    """FISTA on one plane, in place on ``z`` and ``y`` (both the start point on entry);
    ``history[k]`` receives ``y_k`` when ``history`` is given (for the backward)."""
    height, width = x.shape
    for k in range(momenta.shape[0]):
        if history is not None:
            history[k] = y
        _plane_flux(y, None, eps2, wx, wy)
        beta = momenta[k]
        for i in range(height):
            for j in range(width):
                grad = m[i, j] * (y[i, j] - x[i, j]) + lam * _adjoint_at(wx, wy, i, j)
                z_next = y[i, j] - step * grad
                y[i, j] = z_next + beta * (z_next - z[i, j])
                z[i, j] = z_next


@numba.njit(cache=True, nogil=True, parallel=True)
def _fista_planes(x, m, z0, momenta, lam, eps2, step, out):  # pragma: no cover - compiled
    """Solve every (image, channel) plane of ``x`` (B, C, H, W) from ``z0``; result in ``out``."""
    batch, channels, height, width = x.shape
    for p in numba.prange(batch * channels):
        b, c = p // channels, p % channels
        z = z0[b, c].copy()
        y = z0[b, c].copy()
        wx, wy = _zero_flux(height, width, x)
        _plane_solve(x[b, c], m[b, c], z, y, momenta, lam, eps2, step, wx, wy, None)
        out[b, c] = z


@numba.njit(cache=True, nogil=True, parallel=True)
def _fista_planes_backward(x, m, z0, momenta, lam, eps2, step, grad_out, grad_x, grad_z0):  # pragma: no cover
    """Vector-Jacobian product of :func:`_fista_planes` with ``grad_out``, per plane.

    With ``z_{k+1} = y_k - step G(y_k)`` (``G`` the objective's gradient, whose Jacobian
    in ``y`` is the symmetric Hessian ``H(y) v = M v + lam D^T J(D y) D v``, and in ``x`` is
    ``-M``) and ``y_{k+1} = (1 + beta_k) z_{k+1} - beta_k z_k``, the adjoints run backwards
    from ``(zbar_K, ybar_K) = (grad_out, 0)``:
    ``v = zbar_{k+1} + (1 + beta_k) ybar_{k+1}`` (all that reaches ``z_{k+1}``),
    ``zbar_k = -beta_k ybar_{k+1}``, ``ybar_k = v - step H(y_k) v``, ``xbar += step M v``;
    and ``z_0 = y_0`` is the start point, whose adjoint is ``zbar_0 + ybar_0``.
    """
    batch, channels, height, width = x.shape
    iterations = momenta.shape[0]
    for p in numba.prange(batch * channels):
        b, c = p // channels, p % channels
        xp, mp = x[b, c], m[b, c]
        z = z0[b, c].copy()
        y = z0[b, c].copy()
        wx, wy = _zero_flux(height, width, x)
        history = np.empty((iterations, height, width), x.dtype)
        _plane_solve(xp, mp, z, y, momenta, lam, eps2, step, wx, wy, history)
        zbar = grad_out[b, c].copy()
        ybar = np.zeros((height, width), x.dtype)
        v = np.empty((height, width), x.dtype)
        xbar = np.zeros((height, width), x.dtype)
        for k in range(iterations - 1, -1, -1):
            beta = momenta[k]
            for i in range(height):
                for j in range(width):
                    v[i, j] = zbar[i, j] + (1.0 + beta) * ybar[i, j]
                    zbar[i, j] = -beta * ybar[i, j]
            _plane_flux(history[k], v, eps2, wx, wy)
            for i in range(height):
                for j in range(width):
                    hv = mp[i, j] * v[i, j] + lam * _adjoint_at(wx, wy, i, j)
                    ybar[i, j] = v[i, j] - step * hv
                    xbar[i, j] += step * mp[i, j] * v[i, j]
        grad_x[b, c] = xbar
        grad_z0[b, c] = zbar + ybar


class _CompiledFista(torch.autograd.Function):
    """The FISTA iterations from a start point ``z0`` (compiled, CPU float32/float64):
    ``(z0, x) -> z_K``, with the backward of the unrolled iterations written out
    (:func:`_fista_planes_backward`). Differentiable once (attacks need no more): a backward
    with ``create_graph=True`` raises instead of returning a graph without the Hessian terms."""

    @staticmethod
    def forward(ctx, z0, x, mask, momenta, lam, eps, step):
        arrays = [t.detach().contiguous() for t in (x, mask, z0)]
        out = torch.empty_like(arrays[0])
        _fista_planes(*(a.numpy() for a in arrays), momenta, lam, eps * eps, step, out.numpy())
        ctx.save_for_backward(*arrays)
        ctx.constants = (momenta, lam, eps, step)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the written-out adjoint is not recorded
            raise BenchError("tvm: the compiled solver is differentiable once; for second derivatives "
                             "(create_graph=True) run the torch iterations: tv_reconstruct(..., compiled=False)")
        x, mask, z0 = ctx.saved_tensors
        momenta, lam, eps, step = ctx.constants
        grad_x, grad_z0 = torch.empty_like(x), torch.empty_like(x)
        _fista_planes_backward(x.numpy(), mask.numpy(), z0.numpy(), momenta, lam, eps * eps, step,
                               grad.contiguous().numpy(), grad_x.numpy(), grad_z0.numpy())
        return grad_z0, grad_x, None, None, None, None, None


def tv_reconstruct(x: torch.Tensor, mask: torch.Tensor, lam: float, iterations: int,
                   eps: float = EPS, checkpoint: bool | None = None,
                   compiled: bool | None = None) -> torch.Tensor:
    """Minimise the objective for a given keep ``mask`` (same shape as ``x``, any dtype
    convertible to ``x``'s) with ``iterations`` FISTA steps; output clamped to [0,1].

    ``compiled`` (default: on CPU in float32/float64) runs the iterations in the compiled
    per-plane solver, whose backward is the written-out adjoint of the unrolled iterations;
    otherwise (GPU, half precision, ``compiled=False``) they run as torch operations, and
    ``checkpoint`` (default: whenever autograd records) runs them in blocks of about
    ``sqrt(iterations)`` under activation checkpointing.
    """
    if x.dim() != 4 or mask.shape != x.shape:
        raise BenchError(f"tv_reconstruct expects NCHW images and a mask of the same shape, "
                         f"got {tuple(x.shape)} and {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=x.dtype)
    step = 1.0 / (1.0 + 8.0 * lam / eps)
    momenta = _momentum_schedule(iterations)
    z = _start_point(x, mask)
    if compiled is None:
        compiled = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if compiled:
        weights = np.asarray(momenta, dtype=np.float64)
        return _CompiledFista.apply(z, x, mask, weights, float(lam), float(eps), float(step)).clamp(0.0, 1.0)
    y = z
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and x.requires_grad
    block = max(1, round(math.sqrt(iterations))) if checkpoint else max(1, iterations)
    for start in range(0, iterations, block):
        chunk = momenta[start:start + block]
        if checkpoint:
            z, y = _checkpoint(_fista_block, z, y, x, mask, chunk, lam, eps, step, use_reentrant=False)
        else:
            z, y = _fista_block(z, y, x, mask, chunk, lam, eps, step)
    return z.clamp(0.0, 1.0)


def tvm(x: torch.Tensor, keep: float = 0.5, lam: float = 0.03, iterations: int = 100,
        generator: torch.Generator | None = None, eps: float = EPS) -> torch.Tensor:
    """TVM as a function: per-image Bernoulli(keep) masks from ``generator``, then
    :func:`tv_reconstruct`."""
    if x.dim() != 4:
        raise BenchError(f"tvm expects a 4-D NCHW batch, got shape {tuple(x.shape)}")
    if keep >= 1.0:
        mask = torch.ones_like(x, dtype=torch.bool)  # nothing dropped, nothing drawn
    else:
        mask = draw_keep_mask(x.shape[0], tuple(x.shape[1:]), keep, generator)
    return tv_reconstruct(x, mask, lam, iterations, eps)


def _check_options(keep: float, lam: float, iterations: int, eps: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0.0 < keep <= 1.0):
        raise BenchError(f"tvm: keep (the probability of keeping a pixel) must lie in (0, 1], got {keep!r} "
                         "(Guo et al. 2018 keep half: keep=0.5)")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam < math.inf):
        raise BenchError(f"tvm: lam (the TV weight) must be a finite number >= 0, got {lam!r} "
                         "(Guo et al. 2018: lam=0.03)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise BenchError(f"tvm: iterations must be a positive integer, got {iterations!r} (default 100)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < eps < math.inf):
        raise BenchError(f"tvm: eps (the TV smoothing) must be a finite number > 0, got {eps!r} (default {EPS})")


class TVM(Defense):
    """Total-variation minimization of a randomly pixel-dropped image (Guo et al. 2018)."""

    registered_name = "tvm"
    draws_in_one_call = True  # per-image randomness and computation: one call is the loop
    stochastic = True
    grad_modes = ("none", "bpda", "exact")

    def __init__(self, keep: float = 0.5, lam: float = 0.03, iterations: int = 100, eps: float = EPS):
        super().__init__()
        _check_options(keep, lam, iterations, eps)
        self.keep, self.lam, self.iterations, self.eps = float(keep), float(lam), int(iterations), float(eps)
        self.stochastic = self.keep < 1.0

    def _purify(self, x, generator):
        return tvm(x, self.keep, self.lam, self.iterations, generator, self.eps)

    def config(self):
        return {"keep": self.keep, "lam": self.lam, "iterations": self.iterations, "eps": self.eps}
