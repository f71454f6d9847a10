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

Gradients: ``exact`` backpropagates through IWMF, the resizes and every DDRM step, with
one activation checkpoint per step (memory about one UNet forward plus one image per
step); ``bpda`` is the straight-through approximation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from .. import weights as weights_mod
from ..errors import BenchError
from .adm_unet import ADMConfig, ADMUNet
from .base import Defense
from .ddrm import alphas_cumprod, beta_schedule, ddrm_denoise, skip_sequence
from .diffusion_unet import DDPMUNet, UNetConfig
from .iwmf import iwmf

# Diffusion prior configs ship inside the package (package data), so wheels find them too;
# configs/diffusion in the repository is a link to this folder.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "priors"

# model.type in a prior's YAML -> (config class, module class).
ARCHITECTURES = {"ddpm": (UNetConfig, DDPMUNet), "adm": (ADMConfig, ADMUNet)}


@dataclass(frozen=True)
class PriorConfig:
    """A diffusion prior: UNet architecture, training noise schedule, checkpoint name."""

    name: str
    unet: UNetConfig | ADMConfig  # the YAML's model.type: ddpm (default) or adm
    checkpoint: str | None
    beta_schedule: str
    beta_start: float
    beta_end: float
    num_diffusion_timesteps: int

    @property
    def resolution(self) -> int:
        return self.unet.resolution

    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod(beta_schedule(self.beta_schedule, self.beta_start, self.beta_end,
                                            self.num_diffusion_timesteps))


def load_prior_config(config: str | Path) -> PriorConfig:
    """Read ``iwmf_bench/priors/NAME.yaml`` (or a path to a YAML file)."""
    path = Path(config)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise BenchError(f"diffusion config {str(config)!r} not found ({path}); known: {', '.join(known) or 'none'}")
    try:
        raw = yaml.safe_load(path.read_text())
        diff = raw["diffusion"]
        kind = raw["model"].get("type", "ddpm")
        if kind not in ARCHITECTURES:
            raise ValueError(f"model.type must be one of {', '.join(ARCHITECTURES)}, got {kind!r}")
        return PriorConfig(
            name=path.stem,
            unet=ARCHITECTURES[kind][0].from_dict(raw["image_size"], raw["model"]),
            checkpoint=raw.get("checkpoint"),
            beta_schedule=str(diff["beta_schedule"]),
            beta_start=float(diff["beta_start"]),
            beta_end=float(diff["beta_end"]),
            num_diffusion_timesteps=int(diff["num_diffusion_timesteps"]),
        )
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise BenchError(f"diffusion config {path}: malformed ({type(exc).__name__}: {exc})") from None


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None means automatic: float32 on CPU, bfloat16 autocast on GPU."""
    if dtype is None or dtype == "auto":
        return None
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise BenchError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
        return names[dtype]
    if dtype not in names.values():
        raise BenchError(f"unsupported dtype {dtype}")
    return dtype


def build_unet(cfg: UNetConfig | ADMConfig) -> torch.nn.Module:
    """The architecture a config describes (randomly initialised, on the default device)."""
    module = next(module for config, module in ARCHITECTURES.values() if isinstance(cfg, config))
    return module(cfg)


def load_unet(prior: PriorConfig, path: str | Path) -> torch.nn.Module:
    """Build the UNet without initialising it (meta device) and assign the checkpoint's
    tensors, strictly: every key and shape must match."""
    state = weights_mod.load_state_dict(path)
    with torch.device("meta"):
        unet = build_unet(prior.unet)
    weights_mod.load_strict(unet, state, path, f"a {prior.name} UNet checkpoint", assign=True)
    return unet.float()


class _DDRMPurifier(Defense):
    """Shared machinery of DiffPure and IWMF-Diff (see the module docstring)."""

    stochastic = True
    grad_modes = ("none", "bpda", "exact")

    def __init__(self, lambda_0: float, sigma_y: float, s: int, timesteps: int,
                 weights: str | Path | None, config: str | Path, batch_size: int,
                 dtype: str | torch.dtype | None, channels_last: bool, compile: bool,
                 eta_a: float, eta_b: float, eta_c: float, pretrained: bool,
                 unet: torch.nn.Module | None, init_seed: int, checkpoint_steps: bool):
        super().__init__()
        if not lambda_0 >= 0:
            raise BenchError(f"lambda_0 must be >= 0, got {lambda_0}")
        if not sigma_y >= 0:
            raise BenchError(f"sigma_y must be >= 0, got {sigma_y}")
        if int(s) != s or s < 1:
            raise BenchError(f"window size s must be a positive integer, got {s}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise BenchError(f"batch_size must be a positive integer, got {batch_size}")
        for name, eta in (("eta_a", eta_a), ("eta_b", eta_b), ("eta_c", eta_c)):
            if not 0 <= eta <= 1:
                raise BenchError(f"{name} must lie in [0,1], got {eta}")
        self.prior = load_prior_config(config)
        self.channels = self.prior.unet.in_channels
        skip_sequence(self.prior.num_diffusion_timesteps, int(timesteps))  # validates
        self.lambda_0, self.sigma_y, self.s = float(lambda_0), float(sigma_y), int(s)
        self.timesteps, self.batch_size = int(timesteps), int(batch_size)
        self.eta_a, self.eta_b, self.eta_c = float(eta_a), float(eta_b), float(eta_c)
        self.compute_dtype = _parse_dtype(dtype)
        # (not ``self.compile``: that would shadow nn.Module.compile)
        self.channels_last, self.use_compile = bool(channels_last), bool(compile)
        self.pretrained, self.init_seed = bool(pretrained) and unet is None, int(init_seed)
        # exact mode: recompute each step in backward (memory of one step, ~1.3x the time)
        self.checkpoint_steps = bool(checkpoint_steps)
        self.stochastic = self.lambda_0 > 0 or self.sigma_y > 0
        self._abar = self.prior.alphas_cumprod()  # float64, CPU; not a buffer (.half() must not touch it)
        # Tracks the device chosen with .to() until the (lazily built) UNet exists.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self._weights_path: Path | None = None
        self._eps_fn = None
        self.unet: torch.nn.Module | None = unet
        if unet is not None:
            unet.requires_grad_(False).eval()
        elif self.pretrained:
            if not self.prior.checkpoint:
                raise BenchError(f"diffusion config {self.prior.name!r} names no checkpoint; "
                                 "pass pretrained=False for random weights")
            # Fail fast (WeightsError with the fetch command) before building anything.
            self._weights_path = weights_mod.resolve(self.prior.checkpoint, weights)

    # -- the prior ---------------------------------------------------------------
    def _build_unet(self) -> torch.nn.Module:
        """The UNet: loaded from the resolved checkpoint, or randomly initialised from
        ``init_seed`` without touching the global RNG state."""
        if self._weights_path is not None:
            unet = load_unet(self.prior, self._weights_path)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.init_seed)
                unet = build_unet(self.prior.unet)
        return unet.requires_grad_(False).eval()

    def load_model(self) -> torch.nn.Module:
        """Build (and load) the UNet now on the defense's device; otherwise this happens
        on the first purification."""
        if self.unet is None:
            self.unet = self._build_unet().to(self._anchor.device)
        return self.unet

    def _eps_model(self, device: torch.device):
        self.load_model()
        where = next((t.device for t in (*self.unet.parameters(), *self.unet.buffers())), device)
        if where != device:
            raise BenchError(f"images are on {device} but the diffusion model is on {where}; "
                             "call defense.to(device) first")
        if self._eps_fn is None:
            if self.compute_dtype == torch.float64:
                self.unet.double()
            if self.channels_last:
                self.unet.to(memory_format=torch.channels_last)
            self._eps_fn = torch.compile(self.unet) if self.use_compile else self.unet
        amp = self.compute_dtype in (torch.bfloat16, torch.float16) or (self.compute_dtype is None and device.type == "cuda")
        amp_dtype = self.compute_dtype if self.compute_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        model_dtype = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        fn, channels_last = self._eps_fn, self.channels_last

        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            channels = x_t.shape[1]
            x_t = x_t.to(model_dtype)
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                # A learned-variance model (ADM) returns [eps; variance]: DDRM uses eps only.
                return fn(x_t, t)[:, :channels]

        return eps

    # -- purification ----------------------------------------------------------------
    def _purify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh OS entropy; never touches the global RNG
        if self.lambda_0 > 0:
            # The whole batch first: image i's windows do not depend on batch_size.
            x = iwmf(x, self.lambda_0, self.s, generator)
        if self.sigma_y == 0:
            return x
        height, width = x.shape[-2:]
        res = self.prior.resolution
        work = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        y = x.to(work)
        if (height, width) != (res, res):
            y = F.interpolate(y, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        y = 2.0 * y - 1.0
        eps = self._eps_model(x.device)
        outs = []
        for chunk in y.split(self.batch_size):
            outs.append(ddrm_denoise(eps, chunk, 2.0 * self.sigma_y, self._abar, self.timesteps, generator,
                                     eta_a=self.eta_a, eta_b=self.eta_b, eta_c=self.eta_c,
                                     checkpoint=self.checkpoint_steps and torch.is_grad_enabled()))
        out = ((torch.cat(outs) + 1.0) / 2.0).clamp(0.0, 1.0)
        if (height, width) != (res, res):
            out = F.interpolate(out, size=(height, width), mode="bilinear", antialias=True,
                                align_corners=False).clamp(0.0, 1.0)
        return out.to(x.dtype)

    def config(self) -> dict[str, Any]:
        cfg = {"sigma_y": self.sigma_y, "timesteps": self.timesteps, "eta_a": self.eta_a,
               "eta_b": self.eta_b, "eta_c": self.eta_c, "prior": self.prior.name,
               "weights": self.prior.checkpoint if self.pretrained else "random"}
        if self.lambda_0 > 0:
            cfg.update(lambda_0=self.lambda_0, s=self.s)
        return cfg


class DiffPure(_DDRMPurifier):
    """DDRM denoising under a diffusion prior (IWMF-Diff with lambda_0=0)."""

    registered_name = "diffpure"

    def __init__(self, sigma_y: float = 0.15, timesteps: int = 20, weights: str | Path | None = None,
                 config: str | Path = "celeba_hq", batch_size: int = 8,
                 dtype: str | torch.dtype | None = None, channels_last: bool = False,
                 compile: bool = False, *, eta_a: float = 0.85, eta_b: float = 1.0,
                 eta_c: float = 0.85, pretrained: bool = True, unet: torch.nn.Module | None = None,
                 init_seed: int = 0, checkpoint_steps: bool = True):
        super().__init__(0.0, sigma_y, 3, timesteps, weights, config, batch_size, dtype,
                         channels_last, compile, eta_a, eta_b, eta_c, pretrained, unet, init_seed,
                         checkpoint_steps)


class IWMFDiff(_DDRMPurifier):
    """IWMF-Diff: IWMF blur, then DDRM restoration under a diffusion prior (``config``)."""

    registered_name = "iwmfdiff"

    def __init__(self, lambda_0: float = 0.25, sigma_y: float = 0.15, s: int = 3, timesteps: int = 20,
                 weights: str | Path | None = None, config: str | Path = "celeba_hq",
                 batch_size: int = 8, dtype: str | torch.dtype | None = None,
                 channels_last: bool = False, compile: bool = False, *, eta_a: float = 0.85,
                 eta_b: float = 1.0, eta_c: float = 0.85, pretrained: bool = True,
                 unet: torch.nn.Module | None = None, init_seed: int = 0, checkpoint_steps: bool = True):
        super().__init__(lambda_0, sigma_y, s, timesteps, weights, config, batch_size, dtype,
                         channels_last, compile, eta_a, eta_b, eta_c, pretrained, unet, init_seed,
                         checkpoint_steps)


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
