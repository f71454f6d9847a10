"""Image folders named ``NNNNN_label.ext``: loading, validation, saving.

``NNNNN`` is the image id (digits), ``label`` the identity (digits); any format Pillow
reads. Images load as float [0,1] NCHW RGB (grayscale/RGBA/palette converted), ordered
by id. Bad input raises :class:`DataError` with a one-line message that names the file
and the problem.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .models.base import resize

NAME_PATTERN = re.compile(r"^(?P<id>\d+)_(?P<label>\d+)\.(?P<ext>[A-Za-z0-9]+)$")
IGNORED = {".DS_Store", "Thumbs.db"}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    ids: list[int]
    labels: list[int]
    names: list[str]  # file names, e.g. "00000_25.png"
    root: Path

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, n: int) -> "ImageSet":
        return ImageSet(self.images[:n], self.ids[:n], self.labels[:n], self.names[:n], self.root)


def parse_name(path: Path) -> tuple[int, int]:
    m = NAME_PATTERN.match(path.name)
    if not m:
        raise DataError(f"{path}: file name does not match NNNNN_label.ext (e.g. 00000_25.png); rename it "
                        "or move it out of the folder")
    return int(m["id"]), int(m["label"])


def read_image(path: Path) -> torch.Tensor:
    """One image as float [0,1] (3, H, W) RGB; DataError if unreadable or too large.

    An image over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about
    89 megapixels: Pillow warns above it and refuses above twice that) is refused in both
    cases, before it is decoded: a face needs far fewer pixels, and decoding one such file
    can take gigabytes of memory.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between the limit and twice the limit; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        detail = " ".join(str(exc).split())
        raise DataError(f"{path}: image too large to decode safely ({detail}); downscale or crop it (a face "
                        "needs a few hundred pixels a side) or remove the file") from None


def _decode(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            rgb = im.convert("RGB")
            arr = np.asarray(rgb, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc}); replace or remove the file") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def list_images(folder: str | Path) -> list[tuple[int, int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    entries, seen = [], {}
    for path in sorted(folder.iterdir()):
        if path.name in IGNORED or path.name.startswith(".") or path.is_dir():
            continue
        image_id, label = parse_name(path)
        if image_id in seen:
            raise DataError(f"{path}: duplicate id {image_id:05d} (also {seen[image_id].name}); ids must be unique")
        seen[image_id] = path
        entries.append((image_id, label, path))
    if not entries:
        raise DataError(f"{folder}: no images (expected files named NNNNN_label.ext)")
    return sorted(entries)


def load_folder(folder: str | Path, size: int | None = None) -> ImageSet:
    """Load a folder of ``NNNNN_label.ext`` images, ordered by id.

    All images must share one size unless ``size`` is given, in which case each is
    resized (antialiased) to ``size x size``.
    """
    entries = list_images(folder)
    images = []
    for image_id, label, path in entries:
        img = read_image(path)
        if size is not None:
            img = resize(img.unsqueeze(0), size)[0]
        elif images and img.shape != images[0].shape:
            raise DataError(f"{path}: size {tuple(img.shape[1:])} differs from {tuple(images[0].shape[1:])} "
                            f"of {entries[0][2].name}; pass a size to resize, or align the folder first")
        images.append(img)
    return ImageSet(torch.stack(images), [e[0] for e in entries], [e[1] for e in entries],
                    [e[2].name for e in entries], Path(folder))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] float NCHW -> uint8 NHWC, rounding to nearest (what a saved PNG holds)."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """The float images exactly as they come back after saving as 8-bit PNG."""
    return images.detach().clamp(0, 1).mul(255).round().div(255)


def check_output_folder(output: str | Path, *inputs: str | Path) -> None:
    """Refuse an output folder that is one of the input folders: writing there would
    overwrite (or mix with) the images being read."""
    out = Path(output).resolve()
    for folder in inputs:
        if out == Path(folder).resolve():
            raise DataError(f"{output}: the output folder is the input folder {folder}; "
                            "writing there would overwrite the inputs; choose another --output")


def save_images(images: torch.Tensor, names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Save a [0,1] NCHW batch losslessly as PNG, keeping the names' stems."""
    if len(names) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(names)} names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for arr, name in zip(to_uint8(images).numpy(), names):
        path = out / (Path(name).stem + ".png")
        tmp = path.with_name("." + path.name + ".tmp")
        Image.fromarray(arr, "RGB").save(tmp, format="PNG")
        tmp.replace(path)  # never leave a half-written image under the final name
        paths.append(path)
    return paths
