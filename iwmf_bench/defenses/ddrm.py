"""DDRM (Kawar et al., NeurIPS 2022) for denoising, H = I.

Problem. Observe ``y = x0 + sigma_0 z`` (``z ~ N(0, I)``) and sample a restoration of
``x0`` under a diffusion prior given by a noise predictor ``eps_model(x_t, t)`` trained
with ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

Algorithm. DDRM works in the "variance exploding" variable ``x_mod = x_t / sqrt(abar_t)
= x0 + sigma_t eps`` with ``sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)``. With H = I every
pixel has singular value 1, so each step is one of the paper's cases for all pixels:

* init (t = T):  ``x_mod = y + sqrt(sigma_T^2 - sigma_0^2) z``  (if ``sigma_T > sigma_0``;
  else ``sigma_T z``), i.e. a noisier version of the observation;
* "before" (``sigma_next > sigma_0``: the target is noisier than ``y``):
  ``x_mod' = eta_b y + (1 - eta_b) x0_hat + sqrt(sigma_next^2 - eta_b^2 sigma_0^2) z``;
* "after" (``sigma_next < sigma_0``):
  ``x_mod' = x0_hat + sqrt(1 - eta_a^2) sigma_next (y - x0_hat) / sigma_0 + eta_a sigma_next z``;
* equality (``sigma_next == sigma_0``), which for a general H is the zero-singular-value
  case: ``x_mod' = x0_hat + sqrt(1 - eta_c^2) sigma_next eps_hat + eta_c sigma_next z``
  (so with H = I, ``eta_c`` only matters in this measure-zero case);

where ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``, and then
``x_t' = sqrt(abar_next) x_mod'``. The last step goes to ``abar = 1`` (``sigma = 0``), so
the output is the final ``x0_hat``. Timesteps are DDRM's uniform skip schedule
``range(0, T, T // timesteps)`` (DDRM's ``efficient_generalized_steps``).

Differences from DDRM's reference code, on purpose:

* The initial state is ``sqrt(abar_T) x_mod`` as in the paper; the reference code divides
  by ``sigma_T`` instead, which differs by ``1/sqrt(1 - abar_T)`` (negligible at T = 950
  of the linear schedule, but wrong for short schedules).
* No hard-coded device; all noise comes from an explicit generator (see
  :func:`draw_noise`), drawn before the per-step function so that activation
  checkpointing recomputes exactly the same step.

* The schedule is computed in float64 (the reference uses float32 cumulative products).

DDRM is a variational approximation, not an exact posterior sampler: even with the
optimal ``eps_model`` its output law differs from ``p(x0 | y)`` for every number of
steps and every eta (tests/test_diffusion.py derives the exact law for a Gaussian
prior; e.g. with tau = 0.5, sigma_0 = 0.3 and the defaults the output variance is about
a third of the posterior's). Only the "before" phase with ``eta_b = 1`` is exact.

The model space ([-1, 1] for images) is the caller's business: this module is generic
(tests drive it with an analytic Gaussian oracle); :mod:`.diffusion` maps images there.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import BenchError

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beta_schedule(kind: str, start: float, end: float, num_steps: int) -> torch.Tensor:
    """DDPM noise schedule (float64). Only ``linear`` is needed by the known checkpoints."""
    if kind == "linear":
        return torch.linspace(start, end, num_steps, dtype=torch.float64)
    if kind == "quad":
        return torch.linspace(start ** 0.5, end ** 0.5, num_steps, dtype=torch.float64) ** 2
    raise BenchError(f"unknown beta schedule {kind!r} (known: linear, quad)")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def skip_sequence(num_train_steps: int, timesteps: int) -> list[int]:
    """DDRM's uniform skip: ``range(0, T, T // timesteps)``.

    This has exactly ``timesteps`` entries when ``timesteps`` divides ``T`` (the usual
    case, e.g. 20 of 1000: 0, 50, ..., 950); otherwise DDRM's rule gives a few more.
    """
    if not 1 <= timesteps <= num_train_steps:
        raise BenchError(f"timesteps must be between 1 and {num_train_steps}, got {timesteps}")
    return list(range(0, num_train_steps, num_train_steps // timesteps))


def draw_noise(batch: int, draws: int, shape: tuple[int, ...], generator: torch.Generator | None,
               device: torch.device | str) -> torch.Tensor:
    """All Gaussian noise of one run, shape ``(draws, batch, *shape)`` on ``device``.

    Drawn in float32 on the generator's device (a CPU generator gives the same numbers
    whatever device the computation runs on), image by image, so image ``i`` consumes
    the generator's numbers right after image ``i - 1``: splitting a batch into chunks
    while carrying the generator along gives identical results.
    """
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh OS entropy; never touches the global RNG
    return _stacked([_image_noise(draws, shape, generator) for _ in range(batch)], draws, shape, device)


def _image_noise(draws: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One image's noise of a run: the generator's next ``draws x prod(shape)`` normals."""
    return torch.randn((draws, *shape), generator=generator, dtype=torch.float32, device=generator.device)


def _stacked(per_image: list[torch.Tensor], draws: int, shape: tuple[int, ...],
             device: torch.device | str) -> torch.Tensor:
    if not per_image:
        return torch.empty((draws, 0, *shape), device=device)
    return torch.stack(per_image, dim=1).to(device)


class NoiseTape:
    """Where each image's noise starts in a generator's stream, so that noise is drawn
    later, for any range of images, without holding all of it at once.

    :meth:`mark` records the generator's state before each of the next ``batch`` images
    and moves the generator past their noise (drawn and dropped), exactly as
    :func:`draw_noise` would; :meth:`noise` replays images ``[start, stop)`` from their
    recorded states. Used where the images of one DDRM run were not contiguous in the
    stream (the EOT draws of :meth:`.diffusion._DDRMPurifier.purify_draws`, each preceded
    by its own IWMF windows). Costs one extra Gaussian draw per image; memory one
    generator state per image.
    """

    def __init__(self, generator: torch.Generator, draws: int, shape: tuple[int, ...]):
        self.generator, self.draws, self.shape = generator, int(draws), tuple(shape)
        self.states: list[torch.Tensor] = []

    def mark(self, batch: int) -> None:
        for _ in range(batch):
            self.states.append(self.generator.get_state())
            _image_noise(self.draws, self.shape, self.generator)

    def noise(self, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """The noise of images ``[start, stop)``, as :func:`draw_noise` returns it."""
        replay = torch.Generator(device=self.generator.device)
        per_image = []
        for state in self.states[start:stop]:
            replay.set_state(state)
            per_image.append(_image_noise(self.draws, self.shape, replay))
        return _stacked(per_image, self.draws, self.shape, device)


def noise_draws(num_train_steps: int, timesteps: int) -> int:
    """How many Gaussian draws per image one :func:`ddrm_denoise` run takes (the initial
    state and one per step): the ``draws`` of :func:`draw_noise`."""
    return len(skip_sequence(num_train_steps, timesteps)) + 1


def ddrm_denoise(eps_model: EpsModel, y: torch.Tensor, sigma_0: float, abar: torch.Tensor,
                 timesteps: int, generator: torch.Generator | None = None, *, eta_a: float = 0.85,
                 eta_b: float = 1.0, eta_c: float = 0.85, checkpoint: bool = False,
                 keep_steps: int = 0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample a restoration of ``x0`` from ``y = x0 + sigma_0 z`` (all in model space).

    ``abar``: the training schedule's cumulative alphas, shape ``(T,)``. ``eps_model`` is
    called as ``eps_model(x_t, t)`` with ``t`` a float tensor of shape ``(B,)``.
    ``checkpoint=True`` wraps each step in :func:`torch.utils.checkpoint.checkpoint`
    (used when autograd is recording): memory for backpropagating through all steps is
    then one step's activations plus one image-sized tensor per step. With
    ``keep_steps = k`` the first ``k`` steps keep their activations all the same (no
    recomputation in backward; memory policy of :mod:`.diffusion`). Computation runs
    in ``y``'s dtype (the model may autocast inside ``eps_model``).

    ``noise``: all Gaussian draws of the run, as :func:`draw_noise` returns them for this
    ``generator`` (shape ``(noise_draws(T, timesteps), B, *y.shape[1:])``); given, the
    generator is not used. A CUDA graph of the step loop takes its noise this way: the
    loop itself then does nothing the graph cannot capture.
    """
    if sigma_0 < 0:
        raise BenchError(f"sigma_0 must be >= 0, got {sigma_0}")
    seq = skip_sequence(abar.numel(), timesteps)
    abar_of = [float(a) for a in abar.double().cpu()]
    if noise is None:
        noise = draw_noise(y.shape[0], len(seq) + 1, tuple(y.shape[1:]), generator, y.device)
    elif tuple(noise.shape) != (len(seq) + 1, *y.shape):
        raise BenchError(f"noise must have shape {(len(seq) + 1, *y.shape)}, got {tuple(noise.shape)}")
    noise = noise.to(y.dtype)

    def sigma(a: float) -> float:  # noise level of x_mod at a cumulative alpha
        return math.sqrt(1.0 - a) / math.sqrt(a)

    # Initialisation: p(x_T | y) from the paper, a noisier copy of y.
    a_T = abar_of[seq[-1]]
    sigma_T = sigma(a_T)
    if sigma_T > sigma_0:
        x_mod = y + math.sqrt(sigma_T ** 2 - sigma_0 ** 2) * noise[0]
    else:  # y is noisier than x_T: start from noise alone, as DDRM does
        x_mod = sigma_T * noise[0]
    x = math.sqrt(a_T) * x_mod

    nexts = [-1] + seq[:-1]
    for k, (t, t_next) in enumerate(zip(reversed(seq), reversed(nexts)), start=1):
        a_t = abar_of[t]
        a_next = abar_of[t_next] if t_next >= 0 else 1.0
        step = _make_step(eps_model, t, a_t, a_next, sigma_0, eta_a, eta_b, eta_c)
        if checkpoint and k > keep_steps and torch.is_grad_enabled():
            x = _checkpoint(step, x, y, noise[k], use_reentrant=False)
        else:
            x = step(x, y, noise[k])
    return x


def _make_step(eps_model: EpsModel, t: int, a_t: float, a_next: float, sigma_0: float,
               eta_a: float, eta_b: float, eta_c: float) -> Callable[..., torch.Tensor]:
    """One DDRM step x_t -> x_next as a pure function of (x_t, y, z): all randomness is
    the argument ``z``, so checkpoint recomputation is exact."""
    s_next = math.sqrt(1.0 - a_next) / math.sqrt(a_next)

    def step(x_t: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t_vec = torch.full((x_t.shape[0],), float(t), device=x_t.device)
        eps = eps_model(x_t, t_vec).to(x_t.dtype)
        x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        if s_next > sigma_0:  # "before": the next state is noisier than y
            x_mod = (eta_b * y + (1.0 - eta_b) * x0
                     + math.sqrt(s_next ** 2 - (eta_b * sigma_0) ** 2) * z)
        elif s_next < sigma_0:  # "after": y is noisier than the next state
            x_mod = (x0 + math.sqrt(1.0 - eta_a ** 2) * s_next * (y - x0) / sigma_0
                     + eta_a * s_next * z)
        else:  # sigma_next == sigma_0 (incl. the last step when sigma_0 == 0)
            x_mod = x0 + math.sqrt(1.0 - eta_c ** 2) * s_next * eps + eta_c * s_next * z
        return math.sqrt(a_next) * x_mod

    return step
