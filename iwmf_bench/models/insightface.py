"""InsightFace ArcFace iresnet100 (IResNet-100), 112x112 input, cosine metric.

The paper used the MXNet model zoo's ArcFace ``LResNet100E-IR`` (MS1MV2). Its PyTorch
counterpart is InsightFace's ``arcface_torch`` IResNet-100: the same "improved residual"
design (BN-Conv-BN-PReLU-Conv-BN blocks, stride in the second conv, output block
BN-flatten-FC-BN to a 512-d embedding) with 3/13/30/3 blocks per stage. The architecture
below is written for this package; its module names follow ``arcface_torch`` so that
its ``backbone.pth`` state dicts load strictly.

Weights: checkpoint ``insightface-r100`` is arcface_torch's ``ms1mv3_arcface_r100_fp16``
backbone (MS1MV3, ArcFace loss). InsightFace publishes it only on OneDrive / Baidu Pan
(no direct download link), so the entry points at a Hugging Face mirror pinned to a
revision. These are *not* the paper's MXNet MS1MV2 weights (which would need an
MXNet-to-PyTorch conversion); results with them are a substitute, to be reported as
such.

Input normalization: ``(pixel - 127.5) / 127.5`` (arcface_torch's training transform),
applied inside :meth:`InsightFace.forward` to [0,1] RGB input. Expected crops: the
standard ArcFace 5-point similarity alignment to 112x112 (:mod:`iwmf_bench.align`,
model ``insightface``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import weights as W
from .base import FaceModel

CHECKPOINT = "insightface-r100"

# The official file is distributed through OneDrive/Baidu only. This Hugging Face copy is
# used by several public projects; its sha256 below is the value two independent
# projects pin for this exact revision (it could not be recomputed here: no network when
# this entry was written). Its size is unknown, hence None (about 261 MB: 65.2M fp32
# parameters). A user-supplied file (--weights) is checked against this hash too; an
# official OneDrive download that differs byte-wise will be refused by that check.
W.register_checkpoint(W.Checkpoint(
    name=CHECKPOINT,
    urls=(
        "https://huggingface.co/camenduru/show/resolve/064a379f415f674051145ec4862f54bd6a65073f/"
        "models/arcface/ms1mv3_arcface_r100_fp16.pth",
        "https://huggingface.co/camenduru/show/resolve/main/models/arcface/ms1mv3_arcface_r100_fp16.pth",
    ),
    filename="ms1mv3_arcface_r100_fp16.pth",
    size=None,
    sha256="a566a62357f0c55b679d9ff2f022a294486568be0c00665d39029d0e46a8109b",
    description="InsightFace arcface_torch IResNet-100, ArcFace on MS1MV3 (state dict, about 261 MB)",
))


class IBasicBlock(nn.Module):
    """Improved residual block: BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet for 112x112 faces: four stride-2 stages (64..512 channels), 7x7x512 -> 512."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 13, 30, 3), num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stage = [IBasicBlock(inplanes, planes, stride=2)]
            stage += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        # arcface_torch keeps the embedding BN's scale fixed at 1.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        # Random init (pretrained=False) keeps PyTorch's defaults: arcface_torch's N(0, 0.1)
        # conv init is meant for training with batch statistics; in eval mode (BN running
        # stats 0/1) it overflows to inf/NaN through 100 layers.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet100(num_features: int = 512) -> IResNet:
    return IResNet((3, 13, 30, 3), num_features)


class InsightFace(FaceModel):
    """InsightFace ArcFace IResNet-100 (arcface_torch, MS1MV3 weights), 112x112, cosine.

    ``InsightFace(weights=None, pretrained=True)``: ``weights`` is a local
    ``backbone.pth`` (checked against the pinned sha256), ``pretrained=False`` gives a
    random initialization. Without weights in the cache a
    :class:`~iwmf_bench.errors.WeightsError` names ``iwmf-bench fetch insightface-r100``.

    Default threshold: cosine similarity 0.30, roughly the LFW equal-error operating
    point that third parties report for ArcFace ResNet-100 embeddings (cosine
    0.28-0.33; arcface_torch's own LFW evaluation picks its threshold by 10-fold
    cross-validation and does not publish one). Calibrate on clean data; the harness does.
    """

    registered_name = "insightface"
    input_size = 112
    metric = "cosine"
    threshold = 0.30

    def __init__(self, weights: str | os.PathLike | None = None, pretrained: bool = True):
        super().__init__()
        # Resolve the weights first: a missing checkpoint fails before building the network.
        path = W.resolve(CHECKPOINT, weights) if pretrained or weights is not None else None
        self.net = iresnet100()
        if path is not None:
            self.load_weights(path)
        self.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Strictly load an arcface_torch IResNet-100 state dict."""
        W.load_strict(self.net, W.load_state_dict(path), path, "an arcface_torch IResNet-100 state dict")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """512-d embeddings (not normalized; compare with cosine) of [0,1] RGB 112x112 images."""
        return self.net((x * 255.0 - 127.5) / 127.5)
