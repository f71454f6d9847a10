"""A suite's ``data`` as written, and the files it names on this machine.

A cell's identity (its key) holds ``data`` exactly as the suite writes it, so the same
suite gives the same cells from any folder and on any machine. Two things turn it into
files only when a cell runs:

* ``images: NAME`` names a fetched image set (:mod:`iwmf_bench.image_sets`, e.g. the
  paper's ``paper-images``): its ``source/`` and ``target/`` folders in the cache are the
  folder protocol's sources and targets;
* relative paths (``sources``, ``targets``, and a dataset plugin's ``path_options``)
  resolve against the suite file's folder (the cell's ``root``), not the working
  directory.

:func:`check` looks at every folder, file and image set a suite names before anything
runs, so a missing one stops the run with one line instead of one error per cell.
"""

from __future__ import annotations

from pathlib import Path

from .. import image_sets, registry
from ..errors import BenchError

IMAGE_SET = "images"  # data.images: NAME, a fetched image set's source/ and target/
FOLDER_KEYS = ("sources", "targets")


def _absolute(value: str, root: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or not root else Path(root) / path)


def dataset_path_options(name: str) -> tuple[str, ...]:
    return tuple(getattr(registry.get("datasets", name).factory, "path_options", ()))


def _path_keys(data: dict) -> tuple[str, ...]:
    """The keys of ``data`` that name files or folders."""
    return dataset_path_options(data["dataset"]) if "dataset" in data else FOLDER_KEYS


def resolve(data: dict, root: str = "") -> dict:
    """``data`` with its image set and relative paths made into this machine's paths."""
    out = dict(data)
    if IMAGE_SET in out:
        folder = image_sets.verified(out.pop(IMAGE_SET))
        out.update(sources=str(folder / "source"), targets=str(folder / "target"))
        return out
    for key in _path_keys(out):
        if isinstance(out.get(key), str):
            out[key] = _absolute(out[key], root)
    return out


def resolve_mapping(options: dict, dataset: str, root: str = "") -> dict:
    """A dataset's own options (e.g. a threshold's calibration set) with paths resolved."""
    return {k: _absolute(v, root) if k in dataset_path_options(dataset) and isinstance(v, str) else v
            for k, v in options.items()}


def check(data: dict, root: str, where: str) -> None:
    """Every image set, folder and file ``data`` names exists (one line otherwise)."""
    if IMAGE_SET in data:
        image_sets.verified(data[IMAGE_SET])  # raises the one-line fetch hint
        return
    resolved = resolve(data, root)
    for key in _path_keys(data):
        if key in resolved and isinstance(resolved[key], str) and not Path(resolved[key]).exists():
            raise BenchError(f"{where}: data.{key} {data[key]!r} does not exist (relative paths resolve against "
                             f"the suite file's folder{', ' + root if root else ''}); fix the path, or name a "
                             f"fetched image set (data.images: paper-images, `iwmf-bench fetch paper-images`)")
