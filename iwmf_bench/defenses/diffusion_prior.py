"""Diffusion priors: the YAML files in ``iwmf_bench/priors/`` (architecture, training
noise schedule, checkpoint name), and the UNet they describe, built or loaded strictly
from a checkpoint. The files ship inside the package (package data), so wheels find them
too; ``configs/diffusion`` in the repository is a link to this folder. A defense that reads
a prior declares its file (``data_files``), so the cells using it are keyed on its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .. import weights as weights_mod
from ..errors import BenchError
from .adm_unet import ADMConfig, ADMUNet
from .ddrm import alphas_cumprod, beta_schedule
from .diffusion_unet import DDPMUNet, UNetConfig

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


def prior_path(config: str | Path) -> Path:
    """The YAML file of a prior: ``iwmf_bench/priors/NAME.yaml``, or a path to a YAML file."""
    path = Path(config)
    return path if path.suffix in (".yaml", ".yml") else CONFIG_DIR / f"{config}.yaml"


def load_prior_config(config: str | Path) -> PriorConfig:
    """Read ``iwmf_bench/priors/NAME.yaml`` (or a path to a YAML file)."""
    path = prior_path(config)
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
