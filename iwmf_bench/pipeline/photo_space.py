"""Face models and defenses seen from photo space, for attacks on the raw photo.

Each face model sees its own aligned crop of a photo (:mod:`iwmf_bench.align`: MTCNN
landmarks, a per-model template), so a crop attacked for one model cannot be shown to
another. A real attacker perturbs the photo the system will detect and align. Here
MTCNN runs once per clean photo and each model's alignment becomes a *fixed*,
differentiable warp from the clean photo's landmarks (:class:`PhotoAlignment`): the
attacker is assumed not to move the detector's landmarks (a few 8-bit steps barely do),
and gradients flow through the warp to the photo. :class:`AlignedModel` and
:class:`AlignedDefense` put a model, or a defense in front of a model, behind that warp.
"""

from __future__ import annotations

from typing import Any

import torch

from ..align import Face, WarpPlan, apply_warp, crop_transform, get_spec
from ..defenses.base import Defense, check_images
from ..errors import BenchError


class PhotoAlignment:
    """One model's alignment of each clean photo as a fixed, differentiable warp.

    Attacks may pass any subset of the photos, in any order (Square re-queries only the
    unfinished ones), so each input is matched to the clean photo it perturbs: the
    nearest in L2, since an attack budget is far smaller than the distance between two
    different photos.
    """

    def __init__(self, clean: torch.Tensor, faces: list[Face], model: str):
        spec = get_spec(model)
        if len(faces) != clean.shape[0] or any(f is None for f in faces):
            raise BenchError(f"need one detected face per photo ({clean.shape[0]} photos, "
                             f"{sum(f is not None for f in faces)} faces)")
        h, w = clean.shape[-2:]
        self.clean = clean.detach()
        self.size = spec.size
        self.plans = [WarpPlan.build(crop_transform(face, spec), h, w, spec.size) for face in faces]

    def owners(self, photos: torch.Tensor) -> list[int]:
        """Index of the clean photo each of ``photos`` is a perturbation of."""
        if photos.shape[1:] != self.clean.shape[1:]:
            raise BenchError(f"photos of shape {tuple(photos.shape[1:])}, expected {tuple(self.clean.shape[1:])}")
        clean = self.clean.to(photos.device, photos.dtype)
        with torch.no_grad():
            return [int((clean - p).pow(2).flatten(1).sum(1).argmin()) for p in photos.detach()]

    def __call__(self, photos: torch.Tensor) -> torch.Tensor:
        return torch.cat([apply_warp(photos[i:i + 1], self.plans[j]) for i, j in enumerate(self.owners(photos))])


class AlignedModel(torch.nn.Module):
    """A face model seen from photo space: photo -> its fixed aligned crop -> embedding."""

    def __init__(self, model: torch.nn.Module, alignment: PhotoAlignment):
        super().__init__()
        self.model, self.alignment = model, alignment
        self.metric, self.threshold = model.metric, model.threshold

    @property
    def name(self) -> str:
        return f"{self.model.name} (photo space)"

    def embed(self, photos: torch.Tensor) -> torch.Tensor:
        check_images(photos, f"photos for {self.name}", channels=3)
        return self.model.embed(self.alignment(photos))


class AlignedDefense(Defense):
    """A defense seen from photo space: photo -> the model's fixed aligned crop -> purified crop.

    Unlike other defenses its output is the crop, not an image of the input's shape: it
    feeds the model directly. ``grad_mode`` applies to the wrapped defense; the warp is
    always differentiated exactly (the attacker knows it).
    """

    def __init__(self, defense: Defense, alignment: PhotoAlignment):
        super().__init__()
        self.defense, self.alignment = defense, alignment
        self.stochastic, self.grad_modes, self.channels = defense.stochastic, defense.grad_modes, defense.channels
        self.registered_name = defense.name

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None,
               grad_mode: str = "none") -> torch.Tensor:
        check_images(x, "photos to purify", channels=3)
        return self.defense.purify(self.alignment(x), generator, grad_mode)

    def config(self) -> dict[str, Any]:
        return self.defense.config()

    def report(self, device: str) -> dict[str, Any]:
        return self.defense.report(device)
