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


def draw_chunk(x: torch.Tensor, draws: int) -> int:
    """Images per draw of a :meth:`Defense.purify_draws` batch (a BenchError if ``x`` does
    not split into ``draws`` equal chunks)."""
    if int(draws) != draws or draws < 1 or x.shape[0] % draws:
        raise BenchError(f"purify_draws: {x.shape[0]} images do not split into {draws} equal draws")
    return x.shape[0] // int(draws)


class Defense(torch.nn.Module):
    """Base class of purification defenses (see the module docstring for the contract)."""

    stochastic: ClassVar[bool] = False
    grad_modes: ClassVar[tuple[str, ...]] = ("none", "bpda", "exact")

    @classmethod
    def data_files(cls, options: dict) -> list:
        """Files other than code that a defense built with these ``options`` reads and whose
        content decides its output (a diffusion prior's YAML): declared here, next to the
        code that reads them, and hashed into the key of every cell that uses them, so an
        edit recomputes those cells and no other. Weights fetched by sha256 need not be
        listed. Default: none."""
        return []
    channels: int | None = None  # channels the defense needs (None: any)
    #: One :meth:`purify` call on the stacked draws equals the loop of calls (each image
    #: consumes the generator in turn, as much whatever the batch), see :meth:`purify_draws`.
    draws_in_one_call: ClassVar[bool] = False

    def _purify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None,
               grad_mode: str = "none") -> torch.Tensor:
        """Purify ``x`` (values in [0,1]); ``grad_mode`` says how gradients pass."""
        return self._with_grad_mode(x, grad_mode, lambda images: self._purify(images, generator))

    def _with_grad_mode(self, x: torch.Tensor, grad_mode: str, purifier) -> torch.Tensor:
        """Check ``grad_mode`` and ``x``, then run ``purifier(x)`` with gradients passing as
        ``grad_mode`` says (shared by :meth:`purify` and overrides of :meth:`purify_draws`)."""
        if grad_mode not in GRAD_MODES:
            raise BenchError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if grad_mode != "none" and grad_mode not in self.grad_modes:
            raise BenchError(f"defense {self.name!r} does not support grad_mode {grad_mode!r} "
                             f"(supported: {', '.join(self.grad_modes)})")
        check_images(x, "input to purify", self.channels)
        if grad_mode == "exact":
            return purifier(x)
        with torch.no_grad():
            out = purifier(x.detach())
        if grad_mode == "bpda":
            # Forward: the purified image. Backward: identity (straight-through).
            return x + (out - x).detach()
        return out

    def purify_draws(self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1,
                     grad_mode: str = "none") -> torch.Tensor:
        """Several draws of the purification in one call: ``x`` holds ``draws`` equal-sized
        chunks (draw-major: rows ``d*B .. (d+1)*B - 1`` are draw ``d``), and the result is,
        exactly, that of ``draws`` consecutive :meth:`purify` calls on the chunks carrying
        ``generator`` along, concatenated.

        EOT attacks (several draws of the randomness per step) call this once per step.
        The default is that loop. A defense overrides it to run all draws as one batch (one
        big kernel call: what a GPU wants) while consuming ``generator`` exactly as the loop
        does, so an attack's results do not depend on which path ran; one whose images each
        consume the generator in turn, independently of the batch (no draws per call),
        only needs to set :attr:`draws_in_one_call`. tests/test_batched_eot.py checks every
        registered defense against the loop.
        """
        per_draw = draw_chunk(x, draws)
        if draws == 1 or self.draws_in_one_call:
            return self.purify(x, generator, grad_mode)
        return torch.cat([self.purify(chunk, generator, grad_mode) for chunk in x.split(per_draw)])

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.purify(x, generator)

    @property
    def name(self) -> str:
        return getattr(self, "registered_name", type(self).__name__.lower())

    def config(self) -> dict[str, Any]:
        """Parameters that identify this defense in results (hashing, leaderboards)."""
        return {}

    def report(self, device: str) -> dict[str, Any]:
        """Facts for a cell's record, as plain data: what the defense chose on ``device``
        (fast paths) and what its last call did (a memory policy). The pipeline asks after
        the attack and after scoring and copies the answer; default: nothing to report."""
        return {}


class NoDefense(Defense):
    """No purification: the identity (baseline row of every leaderboard)."""

    registered_name = "none"
    draws_in_one_call = True  # deterministic, image by image: one call is the loop
    stochastic = False

    def _purify(self, x, generator):
        return x
