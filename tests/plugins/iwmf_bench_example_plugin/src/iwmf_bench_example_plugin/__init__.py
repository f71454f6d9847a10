"""Example iwmf-bench plugin: a JPEG-compression defense and a random-noise attack.

Everything a plugin needs: subclass the contracts, declare entry points in
pyproject.toml, install the package. See CONTRIBUTING.md of iwmf-bench.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from iwmf_bench.attacks.base import Attack, AttackResult, make_generator
from iwmf_bench.defenses.base import Defense


class JPEG(Defense):
    """JPEG compression at a given quality (deterministic, no gradient but BPDA)."""

    registered_name = "example-jpeg"
    stochastic = False
    grad_modes = ("none", "bpda")

    def __init__(self, quality: int = 75):
        super().__init__()
        self.quality = int(quality)

    def _purify(self, x, generator):
        out = []
        for img in x.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255))
        return torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype)

    def config(self):
        return {"quality": self.quality}


class UniformNoise(Attack):
    """Uniform random noise inside the Linf ball (a baseline, not a real attack)."""

    registered_name = "uniform-noise"

    def _run(self, task):
        g = make_generator(task.seed, "uniform-noise")
        noise = (torch.rand(task.sources.shape, generator=g) * 2 - 1) * self.eps
        adv = (task.sources + noise.to(task.sources.device)).clamp(0, 1)
        with torch.no_grad():
            success = self.succeeded(self.objective(task, adv))
        return AttackResult(adv, success.cpu(), torch.ones(adv.shape[0], dtype=torch.long))
