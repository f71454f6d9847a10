"""The scorer's draws: how adversarial images are scored on a random defense, and the
view of those draws an attacker who knows the randomness gets.

:func:`evaluate` is what the harness, the CLI and the attacks that score themselves
report:

* single-shot rate: the fraction of all ``N x n_draws`` submissions that succeed (each a
  fresh purification), i.e. the expected rate of one submission;
* worst-of-N rate: the fraction of samples that succeed in at least one of ``n_draws``
  purifications (the attacker may resubmit the same image).

For impersonation success is acceptance (this is the FAR under attack); for dodging,
rejection. A deterministic defense (or none) needs one draw; both rates then coincide.
:func:`scorer_draws` is the one place the order of the draws is written.

Known randomness: the attacker knows the draws the scorer will use. A random defense
(IWMF's windows, DiffPure's noise) is a fixed function once its draws are fixed. Liu et
al. (ICLR 2025) and Liu & Wei (2025) attack DiffPure with its randomness fixed and find
that most of its robustness was the randomness. A threat model with ``randomness: known``
gets the defense as :class:`KnownDraws`: a view of it that, at every step of the attack,
replays the ``draws`` purifications the scorer will make (:func:`scorer_draws` on the task
seed's ``"evaluate"`` stream: the same function, the same generator, the same batches), so
the attack's EOT is an exact sum over the draws that decide the cell. The cell is then
scored on those draws (its rates) and on fresh ones (:data:`FRESH_STREAM`): what the
attack keeps when its knowledge turns out wrong. The gap between a known cell and the
same attack with unknown randomness is the part of the robustness that comes from
stochasticity.

The view asks all draws at once, on all the scored images in their order: an attack's
EOT must evaluate ``eot_iter == draws`` draws per step on the whole batch, in one
``purify_draws`` call (APGD-EOT and selective EOT do; a subset of the images, or one draw
per call, is refused with the reason).

This module belongs to neither the attacks nor the pipeline: the scoring stage and the
attacks both ask it, so the stage needs no particular attack's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import metrics
from .attacks.base import GOALS, is_random, make_generator
from .data import quantize
from .defenses.base import Defense
from .errors import BenchError, NotApplicableError

EVALUATE_BATCH = 64  # images per purification call at scoring (the draws depend on it: keep it)


@dataclass
class Evaluation:
    """Success of adversarial images over ``n_draws`` fresh purifications."""

    single_shot: metrics.Rate
    worst_of_n: metrics.Rate
    n_draws: int
    accepted: torch.Tensor  # (N, n_draws) bool: was submission (i, d) accepted?
    margin: torch.Tensor  # (N, n_draws) verification margin (> 0: accepted) of each submission
    embeddings: torch.Tensor | None = None  # (n_draws, N, D) of the purified submissions (CPU)
    scores: torch.Tensor | None = None  # (N, n_draws) verification score (the model's metric) of each submission

    def successes(self, goal: str) -> list[int]:
        """Per image, the draws on which the attack's goal was met (accepted; dodging: rejected)."""
        success = self.accepted if goal == "impersonation" else ~self.accepted
        return [int(k) for k in success.sum(dim=1).tolist()]

    def to_dict(self) -> dict[str, Any]:
        return {"single_shot": self.single_shot.to_dict(), "worst_of_n": self.worst_of_n.to_dict(),
                "n_draws": self.n_draws}


@torch.no_grad()
def evaluate(model, defense: Defense | None, adv: torch.Tensor, references: torch.Tensor, seed: int,
             n_draws: int = 10, goal: str = "impersonation", threshold: float | None = None,
             batch_size: int = EVALUATE_BATCH, stream: tuple = ("evaluate",)) -> Evaluation:
    """Score ``data.quantize(adv)`` (the 8-bit images an attacker submits) against
    ``references`` through ``defense`` (None: undefended) on fresh randomness.

    Draws come from the task seed's ``stream`` (``"evaluate"``, which no attack uses
    unless the threat model gives it the randomness: :class:`KnownDraws`), in the order of
    :func:`scorer_draws`.
    """
    if goal not in GOALS:
        raise BenchError(f"evaluate: goal must be one of {GOALS}, got {goal!r}")
    if int(n_draws) != n_draws or n_draws < 1:
        raise BenchError(f"evaluate: n_draws must be a positive integer, got {n_draws}")
    if references.shape[0] != adv.shape[0]:
        raise BenchError(f"evaluate: {adv.shape[0]} images but {references.shape[0]} references")
    x = quantize(adv)
    references = references.to(x.device)
    thr = float(model.threshold if threshold is None else threshold)
    random = is_random(defense, x, seed)
    draws = int(n_draws) if random else 1
    accepted, margin, embeddings, scores = [], [], [], []
    for z in scorer_draws(defense, x, make_generator(seed, *stream), draws, batch_size):
        emb = torch.cat([model.embed(z[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        s = metrics.scores(emb, references, model.metric)
        accepted.append(metrics.accepts(s, thr, model.metric).cpu())
        margin.append(metrics.margin(s, thr, model.metric).cpu())
        embeddings.append(emb.cpu())
        scores.append(s.cpu())
    accepted, margin = torch.stack(accepted, dim=1), torch.stack(margin, dim=1)
    success = accepted if goal == "impersonation" else ~accepted
    # The draws of one image are not independent trials: its interval counts images.
    return Evaluation(single_shot=metrics.Rate(int(success.sum()), int(success.numel()),
                                               clusters=int(success.shape[0]) if draws > 1 else None),
                      worst_of_n=metrics.Rate(int(success.any(dim=1).sum()), int(success.shape[0])),
                      n_draws=draws, accepted=accepted, margin=margin, embeddings=torch.stack(embeddings),
                      scores=torch.stack(scores, dim=1))


def scorer_draws(defense: Defense | None, x, generator: torch.Generator, draws: int,
                 batch_size: int = EVALUATE_BATCH, grad_mode: str = "none"):
    """The scorer's purifications of ``x``, one ``(N, ...)`` tensor per draw: draw by draw,
    each batch of ``batch_size`` images in turn, one generator carried along. The one place
    that order is written: the scorer (:func:`evaluate`) and an attacker that knows the
    randomness (:class:`KnownDraws`) both purify through it, so
    they see the same draws by construction. ``x``: the images, or one copy of them per draw
    (an attacker's, each with its own gradient; the draws depend on the shapes only)."""
    copies = list(x) if isinstance(x, (list, tuple)) else [x] * draws
    if len(copies) != draws:
        raise BenchError(f"scorer_draws: {len(copies)} copies of the images for {draws} draws")
    for z in copies:
        if defense is None:
            yield z
        else:
            yield torch.cat([defense.purify(z[i:i + batch_size], generator, grad_mode)
                             for i in range(0, z.shape[0], batch_size)])


RANDOMNESS = ("unknown", "known")
SCORER_STREAM = ("evaluate",)  # the stream :func:`evaluate` draws from
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
