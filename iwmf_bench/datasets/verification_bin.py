"""``verification-bin``: the ``.bin`` verification sets of face-recognition training repos
(InsightFace's ``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

The file is a pickle of ``(bins, issame)``: ``bins`` a list of encoded images (JPEG/PNG
bytes, 2 per pair, already aligned, usually 112x112), ``issame`` a list of bools, one per
consecutive image pair. Unpickling a file can run arbitrary code, so the loader admits
only the opcodes that build bytes, lists, tuples and bools, refuses every global
(``find_class``), and checks the shape of what it built. Images are decoded only when
read; their encoded bytes stay in memory (a few hundred MB at most for these sets).
Folds: 10 contiguous blocks of pairs, as InsightFace's evaluation splits them.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .base import Dataset, DatasetError, Pair

# Opcodes that build bytes (Python 3 bytes, or Python 2 str read as bytes), lists,
# tuples and bools, plus framing and memo bookkeeping. Nothing here can name a global or
# call anything.
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK",
    "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "NEWTRUE", "NEWFALSE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BINSTRING", "SHORT_BINSTRING",
    "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET", "MEMOIZE",
})
# Opcodes that import or call something: named first when a file is refused.
CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD",
                          "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"})
FOLDS = 10


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # second line of defence behind the opcode check
        raise pickle.UnpicklingError(f"global {module}.{name}")


def safe_load(data: bytes, origin: str) -> object:
    """Unpickle ``data`` admitting only bytes, lists, tuples and bools."""
    try:
        refused, strings = [], []
        for op, arg, pos in pickletools.genops(data):
            if isinstance(arg, str):
                strings = (strings + [arg])[-2:]
            if (op.name == "INT" and arg in (True, False)) or op.name in ALLOWED_OPCODES:
                continue  # INT 01/00: protocol 0/1 bools
            what = {"GLOBAL": f" ({arg})", "INST": f" ({arg})",
                    "STACK_GLOBAL": f" ({'.'.join(strings)})"}.get(op.name, "")
            refused.append((op.name not in CODE_OPCODES, pos, f"{op.name}{what}"))
        if refused:
            _, pos, what = min(refused)  # name the first opcode that could run code, if any
            raise DatasetError(f"{origin}: refused: the pickle uses {what} at byte {pos}; a verification .bin "
                               "holds only bytes, lists, tuples and bools, so this file is not one (or was "
                               "tampered with); nothing in it was run")
        return _NoGlobals(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, ValueError, EOFError) as exc:
        raise DatasetError(f"{origin}: not a readable verification .bin pickle ({exc})") from None


class VerificationBin(Dataset):
    """InsightFace-style .bin verification set (lfw.bin, cfp_fp.bin, agedb_30.bin).

    Loaded with a restricted unpickler (bytes, lists, tuples, bools only). Images are
    aligned already; identities are unknown (labels None), so threat pairs come from
    the listed pairs.
    """

    registered_name = "verification-bin"
    path_options = ("path",)

    def __init__(self, path: str):
        p = Path(path)
        self.options = {"path": str(p.resolve())}
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read the .bin file ({exc.strerror})") from None
        obj = safe_load(data, str(path))
        del data
        if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
                and isinstance(obj[1], (list, tuple))):
            raise DatasetError(f"{path}: expected a pickle of (list of encoded images, list of bools)")
        bins, issame = obj
        if not all(isinstance(b, bytes) for b in bins) or not all(isinstance(s, bool) for s in issame):
            raise DatasetError(f"{path}: the image list must hold bytes and the is-same list bools")
        if len(bins) != 2 * len(issame):
            raise DatasetError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 images per pair")
        self._bins = list(bins)
        self.names = [f"{p.name}#{i}" for i in range(len(bins))]
        self.labels = [None] * len(bins)
        per_fold = -(-len(issame) // FOLDS)
        self._pairs = [Pair(2 * i, 2 * i + 1, bool(s), i // per_fold) for i, s in enumerate(issame)]

    def read(self, index: int) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(self._bins[index])) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(f"{self.options['path']}: image {index} is not a readable encoded image "
                               f"({exc})") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)

    def pairs(self) -> list[Pair]:
        return list(self._pairs)
