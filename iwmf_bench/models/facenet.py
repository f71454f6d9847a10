"""FaceNet: facenet-pytorch's Inception-ResNet-v1, 160x160 input, cosine metric.

The architecture is facenet-pytorch's ``InceptionResnetV1`` built with
``pretrained=None`` (so facenet-pytorch never downloads anything itself); the weights are
the published facenet-pytorch state dicts (converted from David Sandberg's TensorFlow
``20180402-114759`` VGGFace2 and ``20180408-102900`` CASIA-WebFace models), fetched with
``iwmf-bench fetch facenet-vggface2`` / ``facenet-casia-webface`` and loaded through
:func:`iwmf_bench.weights.resolve` (size/sha256 check) and
:func:`iwmf_bench.weights.load_state_dict` (tensor-only loading), strictly.

Input normalization: the models were trained on ``(pixel - 127.5) / 128`` (facenet-pytorch's
``fixed_image_standardization``); :meth:`FaceNet.forward` applies it to the [0,1] input.
The paper's code fed raw [0,1] pixels to this network, which puts every image far off the
training distribution; we deliberately do not repeat that.

Alignment: the crops these models expect are MTCNN box crops (see
:mod:`iwmf_bench.align`, model ``facenet``).
"""

from __future__ import annotations

import os

import torch

from .. import weights as W
from .base import FaceModel

DATASETS = {"vggface2": "facenet-vggface2", "casia-webface": "facenet-casia-webface"}


def _inception_resnet_v1():
    from facenet_pytorch import InceptionResnetV1

    # pretrained=None: random init and no classification layer; we load weights ourselves.
    return InceptionResnetV1(pretrained=None, classify=False)


class FaceNet(FaceModel):
    """FaceNet Inception-ResNet-v1 (facenet-pytorch), VGGFace2 or CASIA-WebFace weights.

    ``FaceNet(weights=None, pretrained=True, dataset="vggface2")``:

    * ``weights``: a local state-dict file to use instead of the cached checkpoint;
    * ``pretrained=False``: random initialization (tests, smoke runs), nothing is loaded;
    * ``dataset``: ``"vggface2"`` (default) or ``"casia-webface"``.

    Without weights in the cache a :class:`~iwmf_bench.errors.WeightsError` names
    ``iwmf-bench fetch facenet-vggface2`` (or ``facenet-casia-webface``).

    Default threshold: cosine similarity 0.40. It is converted from the LFW best-accuracy
    threshold on squared L2 distance between unit embeddings reported for David
    Sandberg's facenet models (about 1.2, via ``d^2 = 2 - 2 cos``); facenet's
    ``validate_on_lfw`` and user reports give 1.20-1.24, i.e. cosine 0.38-0.40. It
    depends on the alignment and the data, so it is only a default: the harness
    calibrates thresholds on clean data, and that calibrated value should be reported.
    """

    registered_name = "facenet"
    input_size = 160
    metric = "cosine"
    threshold = 0.40

    def __init__(self, weights: str | os.PathLike | None = None, pretrained: bool = True,
                 dataset: str = "vggface2"):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        self.dataset = dataset
        self.checkpoint = DATASETS[dataset]
        # Resolve the weights first: a missing checkpoint fails before building the network.
        path = W.resolve(self.checkpoint, weights) if pretrained or weights is not None else None
        self.net = _inception_resnet_v1()
        if path is not None:
            self.load_weights(path)
        self.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Strictly load a facenet-pytorch state dict (its unused ``logits.*`` head dropped)."""
        state = W.load_state_dict(path)
        # The published files carry the training classifier (8631 / 10575 classes); the
        # embedding network does not use it.
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        W.load_strict(self.net, state, path, "a facenet-pytorch InceptionResnetV1 state dict")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm 512-d embeddings of [0,1] RGB images at 160x160."""
        return self.net((x * 255.0 - 127.5) / 128.0)
