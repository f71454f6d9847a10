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
in :attr:`_DDRMPurifier.last_memory_policy` and ``last_memory_info``:

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
one batch, with the loop's randomness (:meth:`_DDRMPurifier.purify_draws`); off, one run
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
small batches are no longer bound by kernel launches. :meth:`_DDRMPurifier.speed_options`
says what a device resolves to.

Over the 400-line cap: prior loading, the runtime helpers and the DDRM purifier are one
module until their split (with one options object for the 19 arguments) lands with the
next recompute of the committed suites (it moves the diffusion cells' keys).
"""

from __future__ import annotations

import collections
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import yaml

from .. import weights as weights_mod
from ..errors import BenchError
from .adm_unet import ADMConfig, ADMUNet
from .base import Defense, draw_chunk
from .ddrm import NoiseTape, alphas_cumprod, beta_schedule, ddrm_denoise, draw_noise, noise_draws, skip_sequence
from .diffusion_unet import DDPMUNet, UNetConfig
from .iwmf import draw_centres, iwmf_apply

# Diffusion prior configs ship inside the package (package data), so wheels find them too;
# configs/diffusion in the repository is a link to this folder.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "priors"

log = logging.getLogger(__name__)

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


def _parse_switch(name: str, value: bool | str | None) -> bool | None:
    """An on/off option that may be left to the device: None or "auto" -> None."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise BenchError(f"{name} must be true, false or auto; got {value!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# Exceptions torch raises through a model on purpose, not failures: activation
# checkpointing stops a recomputation early by raising from inside the forward.
_CONTROL_FLOW = tuple(t for t in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if t)


class CompiledWithFallback:
    """``torch.compile(module)`` that runs ``module`` eagerly from the first call whose
    compilation (or compiled run) raises, calling ``on_fallback(exc)`` once then.

    torch.compile compiles lazily, so failures (no C++ compiler, no Triton, an
    unsupported op) surface at the first call: that call is retried eagerly. An error the
    eager module raises too (a wrong input shape) propagates unchanged, without fallback.
    """

    def __init__(self, module: torch.nn.Module, on_fallback, **compile_kwargs: Any):
        self.module = module
        self.compiled = torch.compile(module, **compile_kwargs)
        self.on_fallback = on_fallback
        self.failed = False

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.failed:
            return self.module(*args)
        try:
            return self.compiled(*args)
        except _CONTROL_FLOW:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "run eagerly"
            out = self.module(*args)  # a genuine error raises here, from the eager module
            self.failed = True
            self.on_fallback(exc)
            return out


class CudaGraphRun:
    """One CUDA graph of a whole function ``run(y, noise) -> x`` for fixed shapes: the
    inputs are copied into static buffers and the graph replayed. ``warm_up()`` runs once
    on a side stream before capture (lazy initialisation, compilation, cuBLAS workspaces)."""

    def __init__(self, run, y: torch.Tensor, noise: torch.Tensor, warm_up, pool=None):
        self.y, self.noise = y.clone(), noise.clone()
        device = y.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm_up(self.y)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = run(self.y, self.noise)

    def __call__(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.y.copy_(y)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the graph's output


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
                 dtype: str | torch.dtype | None, channels_last: bool, compile: bool | str | None,
                 eta_a: float, eta_b: float, eta_c: float, pretrained: bool,
                 unet: torch.nn.Module | None, init_seed: int, checkpoint_steps: bool | str,
                 cuda_graphs: bool | str | None = None, draws_in_one_run: bool | str | None = None):
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
        # (not ``self.compile``: that would shadow nn.Module.compile). None: the device's default.
        self.channels_last = bool(channels_last)
        self.use_compile = _parse_switch("compile", compile)
        self.cuda_graphs = _parse_switch("cuda_graphs", cuda_graphs)
        self.draws_in_one_run = _parse_switch("draws_in_one_run", draws_in_one_run)
        self.pretrained, self.init_seed = bool(pretrained) and unet is None, int(init_seed)
        # exact mode: True recomputes each step in backward, False keeps every step's
        # activations, "auto" keeps what fits (see the module docstring).
        policy = _parse_switch("checkpoint_steps", checkpoint_steps)
        self.checkpoint_steps: bool | str = "auto" if policy is None else policy
        self.last_memory_policy: str | None = None  # keep / checkpoint / mixed; None: no gradient recorded
        self.last_memory_info: dict[str, Any] = {}
        self._step_bytes: dict[tuple, int] = {}
        self._graphs: collections.OrderedDict[tuple, CudaGraphRun] = collections.OrderedDict()
        self._graph_pool = None
        self._graphs_failed = False
        self._warned: set[str] = set()
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

    # -- speed options -------------------------------------------------------------------
    def report(self, device: str) -> dict[str, Any]:
        """The speed paths taken on ``device``, and after exact gradients whether the last
        call kept or checkpointed its steps."""
        policy = dict(self.last_memory_info) if self.last_memory_info else {}
        return {"speed_options": self.speed_options(device), **({"memory_policy": policy} if policy else {})}

    def speed_options(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """What the speed options resolve to on ``device`` (default: the defense's), as
        the benchmark and result records report them."""
        kind = torch.device(device if device is not None else self._anchor.device).type
        amp = self._amp_dtype(kind)
        dtype = f"{str(amp).removeprefix('torch.')} autocast" if amp is not None else \
            str(self.compute_dtype or torch.float32).removeprefix("torch.")
        return {"dtype": dtype, "attention": "sdpa", "channels_last": self.channels_last,
                "compile": self._compile_on(kind), "cuda_graphs": self._graphs_on(kind, warn=False),
                "draws_in_one_run": self._one_run_on(kind), "checkpoint_steps": self.checkpoint_steps}

    def _amp_dtype(self, kind: str) -> torch.dtype | None:
        if self.compute_dtype in (torch.bfloat16, torch.float16):
            return self.compute_dtype
        return torch.bfloat16 if self.compute_dtype is None and kind == "cuda" else None

    def _compile_on(self, kind: str) -> bool:
        return kind == "cuda" if self.use_compile is None else self.use_compile

    def _one_run_on(self, kind: str) -> bool:
        return kind == "cuda" if self.draws_in_one_run is None else self.draws_in_one_run

    def _graphs_on(self, kind: str, warn: bool = True) -> bool:
        """Whether forward-only purification replays CUDA graphs on this device type."""
        if self.cuda_graphs is False or self._graphs_failed:
            return False
        if kind != "cuda":
            if self.cuda_graphs and warn:
                self._warn_once("graphs", f"cuda_graphs: CUDA graphs need a CUDA device (images on {kind}); "
                                "running the DDRM steps eagerly")
            return False
        return True

    def _warn_once(self, key: str, message: str) -> None:
        """Fallbacks say so once per defense, in one line."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", self.name, message)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() may move or replace the parameters: graphs captured on
        # the old ones (and the compiled UNet) are then rebuilt. A no-op .to() keeps them.
        def where() -> tuple:
            return tuple(p.data_ptr() for p in self.unet.parameters()) if self.unet is not None else ()

        before = where()
        result = super()._apply(fn, *args, **kwargs)
        if where() != before:
            self._graphs.clear()
            self._eps_fn, self._step_bytes = None, {}
        return result

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
            if self._compile_on(device.type):
                self._eps_fn = CompiledWithFallback(self.unet, lambda exc: self._warn_once(
                    "compile", f"torch.compile failed ({_first_line(exc)}); running the UNet eagerly"))
            else:
                self._eps_fn = self.unet
        amp_dtype = self._amp_dtype(device.type)
        amp, amp_dtype = amp_dtype is not None, amp_dtype or torch.bfloat16
        model_dtype = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        fn, channels_last = self._eps_fn, self.channels_last

        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            channels = x_t.shape[1]
            x_t = x_t.to(model_dtype)
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            # No cast cache: it holds only grad-requiring leaves (not our frozen weights), and
            # CUDA graph capture wants it off.
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp, cache_enabled=False):
                # A learned-variance model (ADM) returns [eps; variance]: DDRM uses eps only.
                return fn(x_t, t)[:, :channels]

        return eps

    # -- purification ----------------------------------------------------------------
    def _purify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh OS entropy; never touches the global RNG
        # The whole batch's windows first (image i's do not depend on batch_size), then
        # each DDRM chunk's noise as the chunks run (image by image: draw_noise).
        centres = self._draw_windows(x, x.shape[0], generator)
        return self._restore(x, centres, lambda start, stop, device: draw_noise(
            stop - start, self._noise_count(), self._noise_shape(x), generator, device))

    def purify_draws(self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1,
                     grad_mode: str = "none") -> torch.Tensor:
        """All draws in one run of DDRM chunks (``draws_in_one_run``; see
        :meth:`Defense.purify_draws`), otherwise the loop. The randomness is taken in the
        loop's order, each draw's windows and then its images' noise, with the noise
        positions kept on a :class:`.ddrm.NoiseTape` and replayed chunk by chunk; the
        chunks (``batch_size`` images) then run across draw boundaries, which is where the
        speed comes from when a draw is smaller than a chunk. Same windows and noise as the
        loop, so the same images up to the UNet's batch-size-dependent float rounding
        (a UNet call on 6 images differs from three calls on 2 by about 2e-6 on CPU), which
        is why the CPU default stays the loop, bit for bit the committed results."""
        per_draw = draw_chunk(x, draws)
        if draws == 1 or not self._one_run_on(x.device.type):
            return super().purify_draws(x, generator, draws, grad_mode)
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh OS entropy; never touches the global RNG
        tape = NoiseTape(generator, self._noise_count(), self._noise_shape(x))
        centres = []
        for _ in range(draws):
            centres.append(self._draw_windows(x, per_draw, generator))
            if self.sigma_y > 0:
                tape.mark(per_draw)
        windows = None if centres[0] is None else torch.cat(centres)
        return self._with_grad_mode(x, grad_mode, lambda images: self._restore(images, windows, tape.noise))

    def _draw_windows(self, x: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor | None:
        """IWMF's window centres for ``batch`` images shaped like ``x`` (None without IWMF)."""
        if self.lambda_0 == 0:
            return None
        height, width = x.shape[-2:]
        return draw_centres(batch, height, width, int(self.lambda_0 * height * width), self.s, generator)

    def _noise_count(self) -> int:
        return noise_draws(self.prior.num_diffusion_timesteps, self.timesteps)

    def _noise_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        return (x.shape[1], self.prior.resolution, self.prior.resolution)

    def _restore(self, x: torch.Tensor, centres: torch.Tensor | None, noise_for) -> torch.Tensor:
        """IWMF with ``centres`` (if any), then DDRM, chunk by chunk, with the noise that
        ``noise_for(start, stop, device)`` gives for images ``[start, stop)``."""
        if centres is not None:
            x = iwmf_apply(x, centres, self.s)
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
        recording = torch.is_grad_enabled() and y.requires_grad  # an exact-mode call that needs a graph
        self.last_memory_policy, self.last_memory_info = None, {}
        kept, steps, outs, start = 0, 0, [], 0
        for chunk in y.split(self.batch_size):
            noise = noise_for(start, start + chunk.shape[0], chunk.device)
            start += chunk.shape[0]
            if recording:
                keep = self._steps_to_keep(eps, chunk)
                kept, steps = kept + keep, steps + self._num_steps()
                outs.append(self._ddrm(eps, chunk, keep_steps=keep, noise=noise))
            else:
                outs.append(self._ddrm_forward_only(eps, chunk, noise))
        if recording:
            policy = "keep" if kept == steps else "checkpoint" if kept == 0 else "mixed"
            self.last_memory_policy = policy
            self.last_memory_info.update(policy=policy, kept_steps=kept, steps=steps,
                                         rule=str(self.checkpoint_steps))
        out = ((torch.cat(outs) + 1.0) / 2.0).clamp(0.0, 1.0)
        if (height, width) != (res, res):
            out = F.interpolate(out, size=(height, width), mode="bilinear", antialias=True,
                                align_corners=False).clamp(0.0, 1.0)
        return out.to(x.dtype)

    # -- the DDRM step loop --------------------------------------------------------------
    def _num_steps(self) -> int:
        return len(skip_sequence(self.prior.num_diffusion_timesteps, self.timesteps))

    def _ddrm(self, eps, chunk: torch.Tensor, noise: torch.Tensor, keep_steps: int = 0) -> torch.Tensor:
        return ddrm_denoise(eps, chunk, 2.0 * self.sigma_y, self._abar, self.timesteps, None,
                            eta_a=self.eta_a, eta_b=self.eta_b, eta_c=self.eta_c,
                            checkpoint=torch.is_grad_enabled(), keep_steps=keep_steps, noise=noise)

    @torch.no_grad()
    def _ddrm_forward_only(self, eps, chunk: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The step loop without autograd: replayed from a CUDA graph where enabled."""
        if not self._graphs_on(chunk.device.type):
            return self._ddrm(eps, chunk, noise)
        noise = noise.to(chunk.dtype)
        key = (tuple(chunk.shape), chunk.dtype, chunk.device)
        run = self._graphs.get(key)
        if run is None:
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: share memory
                t_warm = torch.full((chunk.shape[0],), float(self.prior.num_diffusion_timesteps // 2),
                                    device=chunk.device)
                run = CudaGraphRun(lambda y, z: self._ddrm(eps, y, z), chunk, noise,
                                   warm_up=lambda y: eps(y, t_warm), pool=self._graph_pool)
            except Exception as exc:  # noqa: BLE001 - capture unsupported here: run eagerly
                self._graphs_failed = True
                self._warn_once("graphs", f"CUDA graph capture failed ({_first_line(exc)}); "
                                "running the DDRM steps eagerly")
                return self._ddrm(eps, chunk, noise)
            self._graphs[key] = run
            while len(self._graphs) > 4:  # batch shapes seen lately (a last partial chunk adds one)
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return run(chunk, noise)

    # -- exact-gradient memory policy ------------------------------------------------------
    def _free_memory(self, device: torch.device) -> int | None:
        """Bytes a kept step may use on ``device``; None where unknown (then checkpoint)."""
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

    def _measure_step_bytes(self, eps, chunk: torch.Tensor) -> int:
        """Bytes one step keeps for backward at this batch shape, measured once: one UNet
        call with autograd recording. CUDA: the allocator's growth while its output
        lives; elsewhere: the storages autograd saves (counted once each)."""
        key = (tuple(chunk.shape), chunk.dtype, str(chunk.device))
        if key not in self._step_bytes:
            x = chunk.detach().clone().requires_grad_(True)
            t = torch.full((chunk.shape[0],), float(self.prior.num_diffusion_timesteps // 2), device=chunk.device)
            if chunk.device.type == "cuda":
                before = torch.cuda.memory_allocated(chunk.device)
                out = eps(x, t)
                used = torch.cuda.memory_allocated(chunk.device) - before
            else:
                saved: dict[int, int] = {}

                def pack(tensor):
                    storage = tensor.untyped_storage()
                    saved[storage.data_ptr()] = storage.nbytes()
                    return tensor

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    out = eps(x, t)
                used = sum(saved.values()) + out.numel() * out.element_size()
            del out
            self._step_bytes[key] = max(int(used), 1)
        return self._step_bytes[key]

    def _steps_to_keep(self, eps, chunk: torch.Tensor) -> int:
        """How many of this chunk's DDRM steps keep their activations (the rest are
        checkpointed); the rule is in the module docstring."""
        steps = self._num_steps()
        if self.checkpoint_steps is True:
            return 0
        if self.checkpoint_steps is False:
            return steps
        free = self._free_memory(chunk.device)
        if free is None:
            self.last_memory_info.setdefault("free_bytes", None)
            return 0
        step = self._measure_step_bytes(eps, chunk)
        keep = max(0, min(steps, int(0.9 * free) // step - 1))
        self.last_memory_info.update(step_bytes=step, free_bytes=free)
        return keep

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
                 compile: bool | str | None = None, *, eta_a: float = 0.85, eta_b: float = 1.0,
                 eta_c: float = 0.85, pretrained: bool = True, unet: torch.nn.Module | None = None,
                 init_seed: int = 0, checkpoint_steps: bool | str = "auto",
                 cuda_graphs: bool | str | None = None, draws_in_one_run: bool | str | None = None):
        super().__init__(0.0, sigma_y, 3, timesteps, weights, config, batch_size, dtype,
                         channels_last, compile, eta_a, eta_b, eta_c, pretrained, unet, init_seed,
                         checkpoint_steps, cuda_graphs, draws_in_one_run)


class IWMFDiff(_DDRMPurifier):
    """IWMF-Diff: IWMF blur, then DDRM restoration under a diffusion prior (``config``)."""

    registered_name = "iwmfdiff"

    def __init__(self, lambda_0: float = 0.25, sigma_y: float = 0.15, s: int = 3, timesteps: int = 20,
                 weights: str | Path | None = None, config: str | Path = "celeba_hq",
                 batch_size: int = 8, dtype: str | torch.dtype | None = None,
                 channels_last: bool = False, compile: bool | str | None = None, *, eta_a: float = 0.85,
                 eta_b: float = 1.0, eta_c: float = 0.85, pretrained: bool = True,
                 unet: torch.nn.Module | None = None, init_seed: int = 0, checkpoint_steps: bool | str = "auto",
                 cuda_graphs: bool | str | None = None, draws_in_one_run: bool | str | None = None):
        super().__init__(lambda_0, sigma_y, s, timesteps, weights, config, batch_size, dtype,
                         channels_last, compile, eta_a, eta_b, eta_c, pretrained, unet, init_seed,
                         checkpoint_steps, cuda_graphs, draws_in_one_run)


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
