"""The perturbation budget: its norms, the check every attack's output passes, and the
rounding of an output to the 8-bit grid inside its budget.

An attack's raw output must lie in [0,1] and within ``eps`` of its sources in its norm
(Linf: ``max|adv - src| <= eps + TOLERANCE``; L2: per image ``||adv - src||_2 <= eps +
TOLERANCE``), else :class:`AttackBudgetError` (a bug, never clipped away). What is scored
is the 8-bit image an attacker submits, rounded inside the same budget around a source that
need not lie on the grid (:func:`quantize_within_budget`).
"""

from __future__ import annotations

import torch

from ..data import quantize

TOLERANCE = 1e-6


class AttackBudgetError(RuntimeError):
    """An attack returned images outside its perturbation budget or outside [0,1] (a bug)."""



def perturbation_norms(adv: torch.Tensor, src: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image size of ``adv - src`` in the given norm."""
    delta = (adv - src).flatten(1)
    return delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)


def check_budget(adv: torch.Tensor, src: torch.Tensor, norm: str, eps: float, what: str = "attack") -> None:
    """Raise :class:`AttackBudgetError` unless ``adv`` is in [0,1] and within ``eps`` of ``src``."""
    if not isinstance(adv, torch.Tensor) or adv.shape != src.shape:
        shape = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
        raise AttackBudgetError(f"{what}: adversarial images have shape {shape}, sources {tuple(src.shape)}")
    if not torch.isfinite(adv).all():
        raise AttackBudgetError(f"{what}: adversarial images contain NaN or infinite values")
    lo, hi = float(adv.min()), float(adv.max())
    if lo < -TOLERANCE or hi > 1 + TOLERANCE:
        raise AttackBudgetError(f"{what}: adversarial images leave [0,1] (range [{lo:.6g}, {hi:.6g}])")
    sizes = perturbation_norms(adv.double(), src.double(), norm)
    worst = int(sizes.argmax()) if sizes.numel() else 0
    if sizes.numel() and float(sizes[worst]) > eps + TOLERANCE:
        raise AttackBudgetError(f"{what}: image {worst} has {norm} perturbation {float(sizes[worst]):.6g} "
                                f"> eps {eps:.6g} (+{TOLERANCE:g})")


def fit_l2_ball(adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Undo float rounding that leaves ``adv`` a hair outside the L2 ball: images whose
    actual ``||adv - x||`` (in float64) exceeds ``eps`` (one for all, or a float64 tensor of
    one per image) are pulled back along ``adv - x``."""
    delta = adv - x
    norms = delta.double().flatten(1).norm(dim=1)
    over = norms > eps
    if not over.any():
        return adv
    scale = torch.where(over, eps / norms * (1 - 1e-6), torch.ones_like(norms)).to(adv.dtype)
    return (x + delta * scale.view(-1, 1, 1, 1)).clamp(0, 1)


def on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(torch.equal(quantize(x), x.detach()))


def quantize_within_budget(adv: torch.Tensor, src: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Round ``adv`` to the 8-bit grid (what a saved PNG holds) without leaving the budget
    around ``src``, which need not lie on the grid (an aligned probe is a warped photo).

    Linf: nearest grid value, clamped to the grid points inside ``[src - eps, src + eps]``
    (there is one when ``eps`` is at least half a level). L2: nearest grid value per image,
    unless that leaves the ball; then each pixel goes to whichever neighbouring grid value
    is nearer the source (on a grid source: ``|q - src| <= |adv - src|`` pixelwise); an
    image still outside (an off-grid source) is rounded from the largest fraction of its
    perturbation that fits (bisection). Raises :class:`AttackBudgetError` when no 8-bit
    image lies within the budget.
    """
    adv, src = adv.detach(), src.detach()
    q = quantize(adv)
    if norm == "Linf":
        lo = torch.ceil(((src - eps) * 255).clamp(0, 255) - 1e-6) / 255
        hi = torch.floor(((src + eps) * 255).clamp(0, 255) + 1e-6) / 255
        if bool((lo > hi).any()):
            raise AttackBudgetError(f"Linf eps {eps:g} holds no 8-bit value around some source pixel "
                                    "(a budget under half a level of 1/255 cannot be submitted as an image)")
        return torch.minimum(torch.maximum(q, lo), hi)
    over = perturbation_norms(q.double(), src.double(), "L2") > eps
    if over.any():
        down, up = torch.floor(adv * 255) / 255, torch.ceil(adv * 255) / 255
        toward = torch.where((down - src).abs() <= (up - src).abs(), down, up).clamp(0, 1)
        q = torch.where(over.view(-1, 1, 1, 1), toward, q)
    for i in torch.nonzero(perturbation_norms(q.double(), src.double(), "L2") > eps).flatten().tolist():
        q[i] = _shrunk_into_l2_ball(adv[i], src[i], eps)
    return q


def _shrunk_into_l2_ball(adv: torch.Tensor, src: torch.Tensor, eps: float, rounds: int = 30) -> torch.Tensor:
    """The 8-bit rounding of ``src + s * (adv - src)`` for the largest ``s`` in [0, 1] found by
    bisection whose rounding lies within L2 ``eps`` of ``src`` (one image)."""
    inside = lambda z: float((z.double() - src.double()).norm()) <= eps  # noqa: E731
    best = quantize(src)
    if not inside(best):
        raise AttackBudgetError(f"L2 eps {eps:g} is smaller than the rounding of the source itself to 8 bits "
                                f"({float((best.double() - src.double()).norm()):.4g}): no 8-bit image lies within it")
    lo, hi = 0.0, 1.0
    for _ in range(rounds):
        mid = (lo + hi) / 2
        z = quantize(src + mid * (adv - src))
        if inside(z):
            lo, best = mid, z
        else:
            hi = mid
    return best
