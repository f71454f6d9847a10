"""The DDRM purifier shared by DiffPure and IWMF-Diff: the sampler run on a prior, with
its speed and memory machinery (compile, CUDA graphs, activation checkpointing of exact
gradients), configured by one :class:`~iwmf_bench.defenses.diffusion_runtime.DiffusionOptions` object. The method, its
options and their measured effects are described in :mod:`iwmf_bench.defenses.diffusion`;
the compositions themselves (:class:`~iwmf_bench.defenses.diffusion.DiffPure`,
:class:`~iwmf_bench.defenses.diffusion.IWMFDiff`) live there.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import weights as weights_mod
from ..errors import BenchError
from .base import Defense, draw_chunk
from .ddrm import NoiseTape, ddrm_denoise, draw_noise, noise_draws, skip_sequence
from .diffusion_prior import build_unet, load_prior_config, load_unet, prior_path
from .diffusion_runtime import CompiledWithFallback, CudaGraphRun, DiffusionOptions, first_line, parse_dtype, parse_switch
from .iwmf import draw_centres, iwmf_apply

log = logging.getLogger(__name__)


class DDRMPurifier(Defense):
    """Shared machinery of DiffPure and IWMF-Diff (see the module docstring)."""

    stochastic = True
    grad_modes = ("none", "bpda", "exact")

    @classmethod
    def data_files(cls, options: dict) -> list[Path]:
        """The data files a defense with these options reads: its prior's YAML (the cell
        key hashes them, :meth:`iwmf_bench.pipeline.cell.Cell.code`)."""
        return [prior_path(options.get("config", "celeba_hq"))]

    def __init__(self, lambda_0: float, sigma_y: float, s: int, options: DiffusionOptions):
        super().__init__()
        self.options = options
        (timesteps, weights, config, batch_size, dtype, channels_last, compile, eta_a, eta_b, eta_c, pretrained,
         unet, init_seed, checkpoint_steps, cuda_graphs, draws_in_one_run) = options.values()
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
        self.compute_dtype = parse_dtype(dtype)
        # (not ``self.compile``: that would shadow nn.Module.compile). None: the device's default.
        self.channels_last = bool(channels_last)
        self.use_compile = parse_switch("compile", compile)
        self.cuda_graphs = parse_switch("cuda_graphs", cuda_graphs)
        self.draws_in_one_run = parse_switch("draws_in_one_run", draws_in_one_run)
        self.pretrained, self.init_seed = bool(pretrained) and unet is None, int(init_seed)
        # exact mode: True recomputes each step in backward, False keeps every step's
        # activations, "auto" keeps what fits (see the module docstring).
        policy = parse_switch("checkpoint_steps", checkpoint_steps)
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
                    "compile", f"torch.compile failed ({first_line(exc)}); running the UNet eagerly"))
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
                self._warn_once("graphs", f"CUDA graph capture failed ({first_line(exc)}); "
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
