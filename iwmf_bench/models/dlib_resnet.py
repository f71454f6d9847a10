"""dlib face ResNet (29 conv, 128-D, euclidean), read by our own .dat parser; no dlib needed.

The network is ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp``, trained
by Davis King and shipped as ``dlib_face_recognition_resnet_model_v1.dat`` in the PyPI
package ``face-recognition-models``. We read that file with a small parser of dlib's
binary serialization (below) into an ordinary :class:`torch.nn.Module`, so gradients
reach the input pixels and dlib itself is never needed at run time.

The file format and its parser: :mod:`iwmf_bench.models.dlib_dat`.

Numerics, as in dlib: input ``(pixel - channel mean) / 256`` with pixels in 0..255;
stride-2 convolutions and pools use no padding; a residual add of different shapes
zero-pads the smaller operand (channels, and the right/bottom edges); the fc weight is
stored (in, out). Descriptors are not unit norm: dlib's threshold 0.6 is a euclidean
distance between raw descriptors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError
from .base import FaceModel
from .dlib_dat import DAT_NAME, INSTALL_HINT, DlibNet, load_dlib_dat

# dlib's training means (R, G, B) on 0..255 pixels; the file carries the same values.
DEFAULT_MEANS = (122.782, 117.001, 104.298)


def default_weights_path() -> Path | None:
    """The .dat file shipped by ``face-recognition-models``, or None if not installed.

    Located without importing the package (its ``__init__`` needs ``pkg_resources``).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / DAT_NAME
        if path.is_file():
            return path
    return None


# ----------------------------------------------------------------------------------------
# The network in torch.


class Affine(nn.Module):
    """dlib's ``affine`` layer: per-channel ``gamma * x + beta`` (a folded batch norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def conv3x3(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
    # dlib pads by size // 2 only at stride 1; stride-2 convolutions are unpadded.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1 if stride == 1 else 0)


def zero_pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger shape, the smaller operand zero-padded
    on extra channels and on the right/bottom edges."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        pad = (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1])
        return F.pad(t, pad) if any(pad) else t

    return grow(a) + grow(b)


def fold_affine(conv: nn.Conv2d, affine: Affine) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``affine(conv(x))`` as one convolution (the per-channel scale
    folded into the kernels, channels-last for the CPU's fast convolution path)."""
    scale = affine.weight.view(-1, 1, 1, 1)
    weight = (conv.weight * scale).contiguous(memory_format=torch.channels_last)
    return weight, conv.bias * affine.weight + affine.bias


def conv_folded(x: torch.Tensor, conv: nn.Conv2d, folded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.conv2d(x, folded[0], folded[1], conv.stride, conv.padding)


class ResUnit(nn.Module):
    """``ares`` (identity shortcut) or ``ares_down`` (shortcut: 2x2 average pool, stride 2)."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.down = down
        self.conv_a = conv3x3(c_in, c_out, 2 if down else 1)
        self.affine_a = Affine(c_out)
        self.conv_b = conv3x3(c_out, c_out, 1)
        self.affine_b = Affine(c_out)

    def forward(self, x: torch.Tensor, folded: tuple | None = None) -> torch.Tensor:
        """``folded``: the two convolutions with their affines folded in (see
        :meth:`DlibResNet.folded`); computed here when not given."""
        fa, fb = folded if folded is not None else (fold_affine(self.conv_a, self.affine_a),
                                                    fold_affine(self.conv_b, self.affine_b))
        y = conv_folded(F.relu(conv_folded(x, self.conv_a, fa)), self.conv_b, fb)
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(zero_pad_add(y, shortcut))


# (c_in, c_out, down) of the 14 residual units, input side first (alevel4 .. alevel0).
UNITS = ([(32, 32, False)] * 3 + [(32, 64, True)] + [(64, 64, False)] * 3
         + [(64, 128, True)] + [(128, 128, False)] * 2 + [(128, 256, True)]
         + [(256, 256, False)] * 2 + [(256, 256, True)])


class DlibResNet(FaceModel):
    """dlib face ResNet v1 (29 conv, 128-D, euclidean 0.6), parsed from its .dat; no dlib needed.

    ``weights``: path to a ``dlib_face_recognition_resnet_model_v1.dat`` (default: the
    one shipped by ``face-recognition-models``); ``pretrained=False`` builds the network
    with random weights and reads no file.
    """

    registered_name = "dlib-resnet"
    input_size = 150
    metric = "euclidean"
    threshold = 0.6

    def __init__(self, weights: str | None = None, pretrained: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(DEFAULT_MEANS, dtype=torch.float32))
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.affine1 = Affine(32)
        self.units = nn.ModuleList(ResUnit(*u) for u in UNITS)
        self.fc = nn.Linear(256, 128, bias=False)
        self.weights_path: str | None = None
        if pretrained:
            path = Path(weights) if weights is not None else default_weights_path()
            if path is None or not path.is_file():
                where = f"at {path}" if path is not None else "(face-recognition-models is not installed)"
                raise WeightsError(f"dlib face ResNet weights not found {where}; install them with "
                                   f"`{INSTALL_HINT}` or pass weights=PATH to a {DAT_NAME}")
            self.weights_path = str(path.resolve())
            self.load_dlib(load_dlib_dat(self.weights_path))
        self.eval()

    def param_slots(self) -> list[tuple[str, list[nn.Parameter]]]:
        """The parametrized layers in forward order, as the parser returns them."""
        slots = [("con", [self.conv1.weight, self.conv1.bias]),
                 ("affine", [self.affine1.weight, self.affine1.bias])]
        for u in self.units:
            slots += [("con", [u.conv_a.weight, u.conv_a.bias]), ("affine", [u.affine_a.weight, u.affine_a.bias]),
                      ("con", [u.conv_b.weight, u.conv_b.bias]), ("affine", [u.affine_b.weight, u.affine_b.bias])]
        return slots + [("fc", [self.fc.weight])]

    @torch.no_grad()
    def load_dlib(self, net: DlibNet) -> None:
        slots = self.param_slots()
        kinds = [k for k, _ in net.layers]
        if kinds != [k for k, _ in slots]:
            raise WeightsError(f"{self.weights_path}: layer sequence does not match dlib's face ResNet")
        for (kind, params), (_, targets) in zip(net.layers, slots):
            for src, dst in zip(params, targets):
                if src.shape != dst.shape:
                    raise WeightsError(f"{self.weights_path}: {kind} parameter of shape {tuple(src.shape)}, "
                                       f"expected {tuple(dst.shape)}")
                dst.copy_(src)
        self.mean.copy_(torch.tensor(net.means, dtype=torch.float32))

    def folded(self) -> list:
        """Every convolution with its affine folded in: conv1's, then each unit's pair.

        dlib's layers stay the parameters (and the state dict); the folded copies save one
        image-sized pass per layer (forward 1.7x faster on CPU with channels-last, equal to
        the unfolded layers to float rounding: tests). They are cached while the parameters
        are unchanged (same storage, same in-place version) and rebuilt under autograd when
        a parameter requires a gradient."""
        params = list(self.parameters())
        key = tuple((q.data_ptr(), q._version, q.device, q.dtype) for q in params)
        if any(q.requires_grad for q in params) and torch.is_grad_enabled():
            key = None
        elif getattr(self, "_folded_key", None) == key:
            return self._folded
        with torch.set_grad_enabled(key is None):
            folded = [fold_affine(self.conv1, self.affine1)]
            folded += [(fold_affine(u.conv_a, u.affine_a), fold_affine(u.conv_b, u.affine_b)) for u in self.units]
        if key is not None:
            # Holding the parameters' storages keeps their addresses from being reused by a
            # replacement tensor (``param.data = ...``) that would then match the key.
            self._folded_key, self._folded, self._folded_hold = key, folded, [q.detach() for q in params]
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] NCHW RGB 150x150 -> (N, 128) raw (not normalized) descriptors."""
        folded = self.folded()
        x = (x * 255 - self.mean.view(1, 3, 1, 1)) / 256
        x = F.relu(conv_folded(x, self.conv1, folded[0]))
        x = F.max_pool2d(x, 3, 2)  # unpadded, like dlib's stride-2 pools
        for unit, pair in zip(self.units, folded[1:]):
            x = unit(x, pair)
        return self.fc(x.mean(dim=(2, 3)))
