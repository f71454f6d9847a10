"""Diffusion purification: DDRM denoising (DiffPure baseline) and IWMF-Diff.

IWMF-Diff (Wang et al., TDSC 2024) blurs the input with IWMF, then restores it with DDRM
denoising (H = I) under a CelebA-HQ DDPM prior; "DiffPure" in that paper is the same
pipeline without IWMF (``lambda_0 = 0``). The prior is a YAML file in
``iwmf_bench/priors/`` chosen with ``config``: ``celeba_hq`` (the default, a DDPM UNet),
``cifar10`` (DDPM, 32x32) or ``imagenet_256`` (guided diffusion's ADM UNet, 256x256), so
the defenses can front a classifier as well as a face model. Per image batch:

1. IWMF at the input resolution (IWMF-Diff only), as in the reference code;
2. antialiased bilinear resize to the prior's resolution (256x256 for CelebA-HQ);
3. map [0,1] -> [-1,1], the space the DDPM was trained in, and run DDRM with
   ``sigma_0 = 2 * sigma_y`` (the same noise level relative to the image range);
4. map back to [0,1], clamp, resize back to the input size.

Differences from the paper's reference code (github.com/azrealwang/iwmfdiff), on
purpose: it fed [0,1] images to the [-1,1] model with ``sigma_0 = sigma_y`` (a prior
mismatch; we map to [-1,1] and double sigma, as DDRM's own runner does), drew its
randomness from global RNG state (we use an explicit generator) and shared one IWMF
window sequence across the batch (we draw one per image).

Defaults follow the reference code and README (``--lambda_0 0.25 --sigma_y 0.15 --s 3``,
20 DDRM steps, ``etaB = 1``, ``etaA = etaC = 0.85``). ``sigma_y = 0`` skips DDRM (the
reference's "0 indicates IWMF").

Gradients: ``exact`` backpropagates through IWMF, the resizes and every DDRM step;
``bpda`` is the straight-through approximation. Exact-gradient memory policy
(``checkpoint_steps``, default ``"auto"``), chosen per call and per batch chunk, recorded
in :attr:`DDRMPurifier.last_memory_policy` and ``last_memory_info``:

* ``keep``: every step keeps its activations for backward (fastest; about one UNet
  forward's activations per step);
* ``checkpoint``: each step is recomputed in backward (memory about one UNet forward
  plus one image per step; 1.3-1.5x the time on CPU, 3.4x measured on an H200);
* ``mixed``: the first ``k`` steps keep theirs, the rest are checkpointed.

``"auto"`` on CUDA keeps as many steps as fit: it measures one step's retained bytes
once per batch shape (one extra UNet forward with autograd recording, counted with
``torch.cuda.memory_allocated``) and keeps ``k`` steps where ``(k + 1)`` steps fit in 90%
of the free device memory (``torch.cuda.mem_get_info`` plus torch's cached blocks); the
extra step is room for backward's recomputation and gradients. On other devices ``"auto"``
checkpoints every step, as before this policy existed (no reliable free-memory figure on
a shared CPU host). ``True`` always checkpoints, ``False`` always keeps.

Speed options and their device defaults (``None`` or ``"auto"`` = the device's default):

=================  ===================================  ===============================
option             CUDA default                         CPU default
=================  ===================================  ===============================
``dtype``          bf16 autocast (GroupNorm in bf16)    float32
``compile``        on, falls back to eager (one line)   off
``cuda_graphs``    on for forward-only purification     off (on request: one line, eager)
``channels_last``  off (an option)                      off
=================  ===================================  ===============================

``draws_in_one_run`` (CUDA default on, CPU off): an EOT step's draws go through DDRM as
one batch, with the loop's randomness (:meth:`DDRMPurifier.purify_draws`); off, one run
per draw, bit for bit the results from before the option existed.

``channels_last`` stays an option: in eager mode on CUDA torch's GroupNorm kernel takes
NCHW only, so every norm converts the layout (fp32 channels_last measured 0.78x on an
H200); under ``compile`` the generated kernels take either layout. On CPU it measured
1.08-1.10x (tiny batch 16, cifar10 batch 2, a loaded 2-core host) with equal results to
float rounding; the CPU default is left as it was.

Attention always goes through ``scaled_dot_product_attention`` with inputs CUDA's fused
kernels accept (see :mod:`.diffusion_unet`). ``cuda_graphs`` captures the whole DDRM step
loop of a batch shape in one CUDA graph (after one warm-up UNet call; the noise is drawn
from the generator outside the graph, so results equal the eager loop's) and replays it:
small batches are no longer bound by kernel launches. :meth:`DDRMPurifier.speed_options`
says what a device resolves to.
"""


from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from .ddrm_purifier import DDRMPurifier, DiffusionOptions


class DiffPure(DDRMPurifier):
    """DDRM denoising under a diffusion prior (IWMF-Diff with lambda_0=0)."""

    registered_name = "diffpure"

    def __init__(self, sigma_y: float = 0.15, timesteps: int = 20, weights: str | Path | None = None,
                 config: str | Path = "celeba_hq", batch_size: int = 8,
                 dtype: str | torch.dtype | None = None, channels_last: bool = False,
                 compile: bool | str | None = None, *, eta_a: float = 0.85, eta_b: float = 1.0,
                 eta_c: float = 0.85, pretrained: bool = True, unet: torch.nn.Module | None = None,
                 init_seed: int = 0, checkpoint_steps: bool | str = "auto",
                 cuda_graphs: bool | str | None = None, draws_in_one_run: bool | str | None = None):
        super().__init__(0.0, sigma_y, 3, DiffusionOptions.of(locals()))


class IWMFDiff(DDRMPurifier):
    """IWMF-Diff: IWMF blur, then DDRM restoration under a diffusion prior (``config``)."""

    registered_name = "iwmfdiff"

    def __init__(self, lambda_0: float = 0.25, sigma_y: float = 0.15, s: int = 3, timesteps: int = 20,
                 weights: str | Path | None = None, config: str | Path = "celeba_hq",
                 batch_size: int = 8, dtype: str | torch.dtype | None = None,
                 channels_last: bool = False, compile: bool | str | None = None, *, eta_a: float = 0.85,
                 eta_b: float = 1.0, eta_c: float = 0.85, pretrained: bool = True,
                 unet: torch.nn.Module | None = None, init_seed: int = 0, checkpoint_steps: bool | str = "auto",
                 cuda_graphs: bool | str | None = None, draws_in_one_run: bool | str | None = None):
        super().__init__(lambda_0, sigma_y, s, DiffusionOptions.of(locals()))


@functools.lru_cache(maxsize=2)
def _shared_iwmfdiff(lambda_0: float, sigma_y: float, s: int, options: tuple) -> IWMFDiff:
    return IWMFDiff(lambda_0=lambda_0, sigma_y=sigma_y, s=s, **dict(options))


def iwmfdiff(x: torch.Tensor, lambda_0: float = 0.25, sigma_y: float = 0.15, s: int = 3,
             generator: torch.Generator | None = None, grad_mode: str = "none", **options: Any) -> torch.Tensor:
    """IWMF-Diff as a function: ``iwmfdiff(x, 0.25, 0.15, generator=g)``.

    ``options`` are :class:`IWMFDiff`'s other keywords (``timesteps``, ``dtype``, ...). The
    defense and its UNet are built once per distinct set of options and reused by later
    calls (two most recent sets kept), on the device of ``x``.
    """
    try:
        defense = _shared_iwmfdiff(float(lambda_0), float(sigma_y), int(s), tuple(sorted(options.items())))
    except TypeError:  # an unhashable option value: nothing to share
        defense = IWMFDiff(lambda_0=lambda_0, sigma_y=sigma_y, s=s, **options)
    return defense.to(x.device).purify(x, generator, grad_mode)
