"""Read a TensorFlow.js graph model (``model.json`` + weight shards) into numpy arrays.

Only data is read: the JSON topology and the raw little-endian weight bytes. Nothing in
the package is executed, and no TensorFlow is needed.

The format, as far as we use it (``tfjs-converter``'s graph-model layout):

* ``model.json`` has ``format: "graph-model"``, a ``modelTopology`` whose ``node`` list is
  the TensorFlow GraphDef (name, op, inputs, attributes), and a ``weightsManifest``: a
  list of groups, each with ``paths`` (shard files, concatenated in order) and
  ``weights`` (name, shape, dtype, optional ``quantization``).
* The weights of a group lie back to back in the concatenated shards, in manifest order.
  An unquantized entry takes ``4 * prod(shape)`` bytes (float32 or int32). A float16
  quantized entry (``quantization: {dtype: "float16"}``) takes 2 bytes per value and is
  widened back to float32.

Other encodings (uint8/uint16 affine quantization, string, bool or complex tensors) are
refused with a :class:`WeightsError` rather than guessed: no model we load uses them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import WeightsError

# Unquantized dtypes we read: dtype -> numpy dtype of the stored bytes.
_PLAIN = {"float32": "<f4", "int32": "<i4"}
# Quantized encodings we read: quantization dtype -> numpy dtype of the stored bytes.
_QUANTIZED = {"float16": "<f2"}


def read_model_json(path: str | Path) -> dict:
    """The parsed ``model.json`` of a graph model (WeightsError if unreadable or not one)."""
    path = Path(path)
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read a TF.js model.json ({exc})") from None
    if not isinstance(model, dict) or model.get("format") != "graph-model" \
            or not isinstance(model.get("weightsManifest"), list):
        raise WeightsError(f"{path}: not a TF.js graph model (format {model.get('format')!r} "
                           f"with a weightsManifest expected)" if isinstance(model, dict)
                           else f"{path}: not a TF.js graph model")
    return model


def _decode(spec: dict, data: bytes, offset: int, where: str) -> tuple[np.ndarray, int]:
    """One manifest entry from ``data`` at ``offset``: (array, next offset)."""
    name, dtype = spec.get("name"), spec.get("dtype")
    shape = tuple(int(s) for s in spec.get("shape", ()))
    count = math.prod(shape)
    quant = spec.get("quantization")
    if quant is not None:
        qtype = quant.get("dtype")
        if qtype not in _QUANTIZED:
            raise WeightsError(f"{where}: weight {name!r} uses {qtype!r} quantization, which this "
                               f"reader does not support (only {sorted(_QUANTIZED)})")
        if dtype != "float32":
            raise WeightsError(f"{where}: weight {name!r} is {qtype}-quantized {dtype}; only float32 expected")
        stored = np.dtype(_QUANTIZED[qtype])
    elif dtype in _PLAIN:
        stored = np.dtype(_PLAIN[dtype])
    else:
        raise WeightsError(f"{where}: weight {name!r} has dtype {dtype!r}, which this reader does not "
                           f"support (only {sorted(_PLAIN)}, or float32 quantized to {sorted(_QUANTIZED)})")
    nbytes = count * stored.itemsize
    if offset + nbytes > len(data):
        raise WeightsError(f"{where}: weight {name!r} needs bytes {offset}..{offset + nbytes} but the "
                           f"shards hold only {len(data)} (truncated file?)")
    values = np.frombuffer(data, dtype=stored, count=count, offset=offset)
    values = values.astype(np.float32 if dtype == "float32" else np.int32).reshape(shape)
    return values, offset + nbytes


def read_weights(model_json: str | Path) -> dict[str, np.ndarray]:
    """Every weight of a graph model by name, float32 (or int32), shards read next to it.

    Raises WeightsError on a missing shard, an unsupported encoding, or a size mismatch
    (the shards must be consumed exactly).
    """
    model_json = Path(model_json)
    model = read_model_json(model_json)
    out: dict[str, np.ndarray] = {}
    for group in model["weightsManifest"]:
        shards = []
        for rel in group.get("paths", []):
            shard = model_json.parent / rel
            # Shard names come from the (untrusted) JSON: stay in the model's folder.
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise WeightsError(f"{model_json}: weight shard path {rel!r} leaves the model's folder")
            try:
                shards.append(shard.read_bytes())
            except OSError as exc:
                raise WeightsError(f"{shard}: cannot read weight shard ({exc.strerror or exc})") from None
        data = b"".join(shards)
        where = f"{model_json} (shards {', '.join(group.get('paths', []))})"
        offset = 0
        for spec in group.get("weights", []):
            out[spec["name"]], offset = _decode(spec, data, offset, where)
        if offset != len(data):
            raise WeightsError(f"{where}: {len(data) - offset} bytes left over after the last weight "
                               f"(the manifest does not describe these shards)")
    return out


def graph_nodes(model: dict) -> list[dict]:
    """The GraphDef node list of a parsed model.json."""
    return model.get("modelTopology", {}).get("node", [])
