"""The diffusion purifiers' options and runtime: :class:`DiffusionOptions` (one object for
the keywords DiffPure and IWMF-Diff share), option parsing (dtype, on/off/auto switches),
``torch.compile`` with an eager fallback, and a whole sampling loop captured as one CUDA
graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from ..errors import BenchError

def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
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


def parse_switch(name: str, value: bool | str | None) -> bool | None:
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


def first_line(exc: BaseException) -> str:
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


@dataclass(frozen=True)
class DiffusionOptions:
    """How a DDRM purifier runs, besides what it restores (``lambda_0``, ``sigma_y``, ``s``):
    the prior (``config``, ``weights`` or ``pretrained=False`` for random weights from
    ``init_seed``, or a ready ``unet``), the sampler (``timesteps``, DDRM's ``eta_a``,
    ``eta_b``, ``eta_c``) and the speed switches (``batch_size``, ``dtype``,
    ``channels_last``, ``compile``, ``checkpoint_steps``, ``cuda_graphs``,
    ``draws_in_one_run``; see :mod:`iwmf_bench.defenses.diffusion`). DiffPure and IWMF-Diff
    take these as keywords and hand them over as one object."""

    timesteps: int = 20
    weights: str | Path | None = None
    config: str | Path = "celeba_hq"
    batch_size: int = 8
    dtype: str | torch.dtype | None = None
    channels_last: bool = False
    compile: bool | str | None = None
    eta_a: float = 0.85
    eta_b: float = 1.0
    eta_c: float = 0.85
    pretrained: bool = True
    unet: torch.nn.Module | None = None
    init_seed: int = 0
    checkpoint_steps: bool | str = "auto"
    cuda_graphs: bool | str | None = None
    draws_in_one_run: bool | str | None = None

    @classmethod
    def of(cls, values: dict[str, Any]) -> "DiffusionOptions":
        """The options among a constructor's keyword values (its ``locals()``)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def values(self) -> tuple:
        """The options in field order (not copied: ``unet`` stays the caller's module)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))
