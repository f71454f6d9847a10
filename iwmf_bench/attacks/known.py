"""Known randomness: the attacker knows the draws the scorer will use.

A random defense (IWMF's windows, DiffPure's noise) is a fixed function once its draws
are fixed. Liu et al. (ICLR 2025) and Liu & Wei (2025) attack DiffPure with its
randomness fixed and find that most of its robustness was the randomness. Here a threat
model with ``randomness: known`` gets the defense as :class:`KnownDraws`: a view of it
that, at every step of the attack, replays the ``draws`` purifications the scorer will
make (:func:`~iwmf_bench.attacks.adaptive.scorer_draws` on the task seed's
``"evaluate"`` stream: the same function, the same generator, the same batches), so the
attack's EOT is an exact sum over the draws that decide the cell. The cell is then scored
on those draws (its rates) and on fresh ones (:data:`FRESH_STREAM`): what the attack
keeps when its knowledge turns out wrong. The gap between a known cell and the same
attack with unknown randomness is the part of the robustness that comes from
stochasticity.

The view asks all draws at once, on all the scored images in their order: an attack's
EOT must evaluate ``eot_iter == draws`` draws per step on the whole batch, in one
``purify_draws`` call (APGD-EOT and selective EOT do; a subset of the images, or one draw
per call, is refused with the reason).
"""

from __future__ import annotations

import torch

from ..defenses.base import Defense
from ..errors import BenchError, NotApplicableError
from .adaptive import EVALUATE_BATCH, scorer_draws
from .base import is_random, make_generator

RANDOMNESS = ("unknown", "known")
SCORER_STREAM = ("evaluate",)  # the stream :func:`~iwmf_bench.attacks.adaptive.evaluate` draws from
FRESH_STREAM = ("evaluate", "fresh")  # a known-randomness cell's images on draws nobody knew


class KnownDraws(Defense):
    """``defense`` with the scorer's draws for ``n_images`` images, replayed on every call."""

    stochastic = True  # a set of draws, not one function: EOT over all of them, never a randomness probe

    def __init__(self, defense: Defense, seed: int, draws: int, n_images: int, batch_size: int = EVALUATE_BATCH):
        super().__init__()
        self.inner, self.seed, self.draws, self.n_images, self.batch_size = defense, int(seed), int(draws), \
            int(n_images), int(batch_size)
        self.grad_modes = defense.grad_modes
        self.registered_name = f"{defense.name} (known draws)"

    def purify_draws(self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1,
                     grad_mode: str = "none") -> torch.Tensor:
        """The scorer's ``draws`` purifications of the images (``x``: ``draws`` copies of the
        scored images, draw-major, copy d purified by draw d); ``generator`` is not used."""
        if draws != self.draws or x.shape[0] != draws * self.n_images:
            raise BenchError(f"known randomness replays the scorer's {self.draws} draws of all {self.n_images} "
                             f"scored images per call, but the attack asked {draws} draw(s) of "
                             f"{x.shape[0] // max(draws, 1)} image(s): use an EOT attack with eot_iter: {self.draws} "
                             "that evaluates all draws at once (apgd, selective-eot, majority-eot; no draws_per_call)")
        # Draw d purifies the d-th copy (its own gradient path): the scorer's d-th draw of it.
        generator = make_generator(self.seed, *SCORER_STREAM)
        return torch.cat(list(scorer_draws(self.inner, list(x.split(self.n_images)), generator, self.draws,
                                           self.batch_size, grad_mode)))

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None,
               grad_mode: str = "none") -> torch.Tensor:
        return self.purify_draws(x, generator, 1, grad_mode)

    def report(self, device=None) -> dict:
        return self.inner.report(device)


def known_view(defense: Defense, seed: int, draws: int, sources: torch.Tensor, eot_iter: int) -> KnownDraws:
    """The defense as an attacker who knows its randomness sees it (checks that this means
    something: a random defense, and an EOT over exactly the scorer's draws)."""
    if not is_random(defense, sources, seed):
        raise NotApplicableError(f"not applicable: defense {defense.name!r} is deterministic, so known randomness "
                                 "is the unknown-randomness attack (its own column)")
    if eot_iter != draws:
        raise BenchError(f"randomness: known replays the scorer's {draws} draws at every step; set eot_iter: "
                         f"{draws} in the threat model (got {eot_iter})")
    return KnownDraws(defense, seed, draws, sources.shape[0])


def check_randomness(value) -> str:
    if value not in RANDOMNESS:
        raise BenchError(f"randomness must be one of {RANDOMNESS}, got {value!r}")
    return value
