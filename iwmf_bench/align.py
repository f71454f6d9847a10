"""Face alignment: raw face photos -> each model's aligned crop.

Faces and their 5 landmarks (eye centres, nose tip, mouth corners, in image-left to
image-right order) come from facenet-pytorch's MTCNN, whose P/R/O-Net weights ship inside
the package (``facenet_pytorch/data/{p,r,o}net.pt``), so detection works offline. When
several faces are found, the largest box is used. Each model then gets the crop it was
trained on:

``dlib-resnet`` (150x150)
    dlib's ``get_face_chip_details(det, size=150, padding=0.25)``, the chip the dlib face
    ResNet was trained and is used on. dlib fits a similarity transform from its
    landmarks to a template derived from the mean face shape listed in
    ``dlib/image_transforms/interpolation.h`` (a point ``p`` of the mean shape lands at
    ``(padding + p) / (2 padding + 1) * size``). dlib's own 5-point template uses eye
    corners and the base of the nose, which MTCNN does not give, so we take the matching
    points from the same mean shape: eye centres = mean of the six eye contour points
    (36-41, 42-47), nose tip = point 30, mouth corners = points 48 and 54. The result is
    dlib's 68-point chip up to landmark noise.
``insightface`` (112x112)
    The standard ArcFace 5-point template (``arcface_dst`` of InsightFace's
    ``face_align.norm_crop``), similarity transform by least squares.
``faceres`` (224x224)
    The ArcFace template, shrunk by 0.8 about the crop centre and scaled to 224. HSE
    FaceRec was trained on VGGFace2's loose crops and its author's code feeds it the
    MTCNN box with a margin, i.e. more context than ArcFace's tight 112 crop; the
    landmark template keeps the rotation normalization. On the 40 shared images
    (genuine/impostor AUC, cosine) it gives 0.9996, the unshrunk template 0.9987.
``facenet`` (160x160)
    facenet-pytorch's MTCNN crop: the detection box, enlarged by ``margin`` pixels of
    the output image (facenet-pytorch's definition; its default is 0), resized to
    160x160. Unlike facenet-pytorch we do not clip the box at the image border (which
    would stretch the face); out-of-image pixels are black, as in dlib chips.

Warping is bilinear (``grid_sample``, pixel centres at integer coordinates as in dlib and
OpenCV); when the crop shrinks the face, the image is first downsampled with an
antialiased resize so that large photos do not alias. Out-of-image pixels are 0.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import check_output_folder, list_images, read_image, save_images
from .errors import BenchError, DataError

# --- templates ---------------------------------------------------------------------------

# dlib mean face shape, points 17-67 (interpolation.h, get_face_chip_details).
_DLIB_MEAN_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689,
)
_DLIB_MEAN_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182,
)


def dlib_mean_point(i: int) -> np.ndarray:
    """Point ``i`` (17..67, iBUG 68-point numbering) of dlib's mean face shape, in [0,1]."""
    if not 17 <= i <= 67:
        raise ValueError(f"dlib's mean face shape has points 17..67, not {i}")
    return np.array([_DLIB_MEAN_X[i - 17], _DLIB_MEAN_Y[i - 17]])


def dlib_template(size: int = 150, padding: float = 0.25) -> np.ndarray:
    """MTCNN's 5 points placed on dlib's face chip of ``size`` with ``padding`` (5x2, pixels)."""
    pts = np.stack([
        np.mean([dlib_mean_point(i) for i in range(36, 42)], axis=0),  # image-left eye
        np.mean([dlib_mean_point(i) for i in range(42, 48)], axis=0),  # image-right eye
        dlib_mean_point(30),  # nose tip
        dlib_mean_point(48),  # image-left mouth corner
        dlib_mean_point(54),  # image-right mouth corner
    ])
    return (padding + pts) / (2 * padding + 1) * size


# InsightFace's arcface_dst (112x112), same point order as MTCNN.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])


@dataclass(frozen=True)
class AlignSpec:
    size: int
    method: str  # "landmarks" or "box"
    template: np.ndarray | None = None
    margin: float = 0.0


SPECS: dict[str, AlignSpec] = {
    "dlib-resnet": AlignSpec(150, "landmarks", dlib_template(150, 0.25)),
    "insightface": AlignSpec(112, "landmarks", ARCFACE_TEMPLATE),
    "facenet": AlignSpec(160, "box", margin=0.0),
    # HSE FaceRec: a looser ArcFace crop (see the module docstring).
    "faceres": AlignSpec(224, "landmarks", ((ARCFACE_TEMPLATE - 56.0) * 0.8 + 56.0) * 2.0),
    # trained on InsightFace's MS1M crops: the ArcFace template itself
    "mobilefacenet-arcface": AlignSpec(112, "landmarks", ARCFACE_TEMPLATE),
}
ALIASES = {"dlib": "dlib-resnet", "arcface": "insightface"}


def get_spec(model: str) -> AlignSpec:
    name = ALIASES.get(model, model)
    if name not in SPECS:
        raise BenchError(f"no alignment defined for model {model!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[name]


# --- geometry ----------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) src -> dst.

    Umeyama (1991) without reflection. ``src`` and ``dst`` are (K, 2) point sets,
    K >= 2; returns the 2x3 matrix ``A`` with ``dst ~= A @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (K, 2) point sets with K >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points are all identical")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    out = np.zeros((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = mu_d - scale * rot @ mu_s
    return out


def box_transform(box: Sequence[float], size: int, margin: float = 0.0) -> np.ndarray:
    """2x3 map from output pixels to image pixels for facenet-pytorch's margin box crop."""
    x1, y1, x2, y2 = (float(v) for v in box)
    mx = margin * (x2 - x1) / (size - margin)
    my = margin * (y2 - y1) / (size - margin)
    x1, x2, y1, y2 = x1 - mx / 2, x2 + mx / 2, y1 - my / 2, y2 + my / 2
    sx, sy = (x2 - x1) / size, (y2 - y1) / size
    # Output pixel centre u covers [x1 + u*sx, x1 + (u+1)*sx) of the crop rectangle.
    return np.array([[sx, 0.0, x1 + 0.5 * sx - 0.5], [0.0, sy, y1 + 0.5 * sy - 0.5]])


def warp_affine(image: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """Sample a ``size x size`` crop from ``image`` (3, H, W).

    ``matrix`` (2x3) maps output pixel coordinates (x, y) to input pixel coordinates,
    pixel centres at integers. Bilinear, zeros outside; antialiased when shrinking.
    Differentiable with respect to ``image``.
    """
    return apply_warp(image.unsqueeze(0), WarpPlan.build(matrix, *image.shape[-2:], size))[0]


@dataclass(frozen=True)
class WarpPlan:
    """:func:`warp_affine` for one image size and matrix, precomputed, so the same fixed
    warp can be applied again to perturbed copies of the image (the cross-model attack
    space, :mod:`iwmf_bench.cross_model`): the antialiased downsampling size (None: no
    shrinking) and the ``grid_sample`` grid (1, size, size, 2; float64)."""

    downsample: tuple[int, int] | None
    grid: torch.Tensor

    @classmethod
    def build(cls, matrix: np.ndarray, h: int, w: int, size: int) -> "WarpPlan":
        a = np.asarray(matrix, dtype=np.float64).copy()
        downsample = None
        scale = float(np.sqrt(abs(np.linalg.det(a[:, :2]))))  # input pixels per output pixel
        if scale > 1.0:
            nh, nw = max(1, round(h / scale)), max(1, round(w / scale))
            fx, fy = nw / w, nh / h  # x' = (x + 0.5) * f - 0.5
            a = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]]) @ np.vstack([a, [0, 0, 1]])
            downsample, (h, w) = (nh, nw), (nh, nw)
        coords = torch.arange(size, dtype=torch.float64)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        at = torch.as_tensor(a)
        sx = at[0, 0] * xx + at[0, 1] * yy + at[0, 2]
        sy = at[1, 0] * xx + at[1, 1] * yy + at[1, 2]
        return cls(downsample, torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1).unsqueeze(0))


def apply_warp(images: torch.Tensor, plan: WarpPlan) -> torch.Tensor:
    """Warp a (B, 3, H, W) batch of images of the plan's size with the plan (differentiable)."""
    if plan.downsample is not None:
        images = F.interpolate(images, size=plan.downsample, mode="bilinear", align_corners=False, antialias=True)
    grid = plan.grid.to(dtype=images.dtype, device=images.device).expand(images.shape[0], -1, -1, -1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0, 1)


# --- detection ---------------------------------------------------------------------------

@dataclass
class Face:
    box: np.ndarray  # (4,) x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) x, y
    prob: float


@functools.lru_cache(maxsize=4)
def _mtcnn(device: str):
    from facenet_pytorch import MTCNN

    # Weights are loaded from the package's own data folder: no download.
    return MTCNN(keep_all=True, device=torch.device(device))


def detect_faces(images: torch.Tensor | Sequence[torch.Tensor], device: str = "cpu",
                 batch_size: int = 32) -> list[Face | None]:
    """The largest face (box, 5 landmarks) of each [0,1] (3, H, W) image, or None.

    Images of equal size are detected in batches (much faster than one by one).
    """
    mtcnn = _mtcnn(str(device))
    if isinstance(images, torch.Tensor) and (images.ndim != 4 or images.shape[1] != 3):
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    results: list[Face | None] = [None] * len(images)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = torch.stack([images[i].detach() for i in chunk]).permute(0, 2, 3, 1).mul(255).to(device)
            with torch.no_grad():
                boxes, probs, points = mtcnn.detect(batch, landmarks=True)
            for i, b, p, pt in zip(chunk, boxes, probs, points):
                if b is None or len(b) == 0:
                    continue
                b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
                pt = np.asarray(pt, dtype=np.float64).reshape(-1, 5, 2)
                p = np.asarray(p, dtype=np.float64).reshape(-1)
                k = int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
                results[i] = Face(b[k], pt[k], float(p[k]))
    return results


# --- alignment ---------------------------------------------------------------------------

def crop_transform(face: Face, spec: AlignSpec) -> np.ndarray:
    """2x3 map from the aligned crop's pixels to the image's pixels for ``face``."""
    if spec.method == "box":
        return box_transform(face.box, spec.size, spec.margin)
    return similarity_transform(spec.template, face.landmarks)


def align_images(images: torch.Tensor | Sequence[torch.Tensor], model: str, device: str = "cpu",
                 faces: Sequence[Face | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops of [0,1] images for ``model`` and a boolean mask of found faces.

    ``images``: a (N, 3, H, W) tensor or a sequence of (3, H, W) tensors of any sizes.
    ``faces``: detections from :func:`detect_faces` to reuse (one per image). Images
    without a face give an all-zero crop and ``ok[i] = False``.
    """
    spec = get_spec(model)
    if faces is None:
        faces = detect_faces(images, device=device)
    n = len(images)
    if len(faces) != n:
        raise ValueError(f"{n} images but {len(faces)} detections")
    out = []
    for img, face in zip(images, faces):
        if face is None:
            out.append(torch.zeros(3, spec.size, spec.size, dtype=img.dtype, device=img.device))
        else:
            out.append(warp_affine(img, crop_transform(face, spec), spec.size))
    if not out:
        return torch.zeros(0, 3, spec.size, spec.size), torch.zeros(0, dtype=torch.bool)
    ok = torch.tensor([f is not None for f in faces], dtype=torch.bool)
    return torch.stack(out), ok


def align_folder(input_dir: str | Path, output_dir: str | Path, model: str, device: str = "cpu") -> int:
    """Align every image of ``input_dir`` (``NNNNN_label.ext``) into ``output_dir`` as PNG.

    Each output keeps its input's name (extension ``.png``). An image without a face or
    that cannot be read is reported on stderr and skipped. Prints a summary and returns
    the number of images that failed.
    """
    spec = get_spec(model)
    entries = list_images(input_dir)
    out_dir = Path(output_dir)
    check_output_folder(out_dir, input_dir)
    failed = 0
    chunk = 32
    for start in range(0, len(entries), chunk):
        paths, images = [], []
        for _, _, path in entries[start:start + chunk]:
            try:
                images.append(read_image(path))
                paths.append(path)
            except DataError as exc:
                print(f"{exc}; skipped", file=sys.stderr)
                failed += 1
        if not images:
            continue
        faces = detect_faces(images, device=device)
        for path, img, face in zip(paths, images, faces):
            if face is None:
                print(f"{path}: no face found; skipped", file=sys.stderr)
                failed += 1
                continue
            aligned, _ = align_images([img], model, faces=[face])
            save_images(aligned, [path.name], out_dir)
    done = len(entries) - failed
    print(f"aligned {done}/{len(entries)} images for {ALIASES.get(model, model)} "
          f"({spec.size}x{spec.size}) into {out_dir}; {failed} failed")
    return failed
