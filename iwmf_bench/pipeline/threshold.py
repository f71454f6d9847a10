"""The cell's acceptance threshold: the model's own, fixed in the suite, or calibrated.

A model entry's ``threshold`` is a number, or ``{far: 0.001, dataset: NAME}``:
calibrated on that dataset's clean impostor pairs (:mod:`iwmf_bench.calibration`,
cached on disk). NAME is the suite's own data when it names the same dataset, or a
mapping ``{dataset: NAME, ...options}``. Every such cell states its threshold and its
source.
"""

from __future__ import annotations

import copy
from typing import Any

from ..calibration import cached_calibration
from ..errors import BenchError
from ..util import factory_options
from . import data_spec
from .cell import Cell
from .dataset_pairs import dataset_options


def validate(path, data: dict, models: dict[str, dict]) -> None:
    """Threshold specs of the suite's models, before anything runs."""
    for label, opts in models.items():
        if "threshold" not in opts:
            continue
        spec = opts["threshold"]
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            continue
        if not isinstance(spec, dict) or set(spec) - {"far", "dataset", "align", "seed"} or "far" not in spec \
                or "dataset" not in spec:
            raise BenchError(f"{path}: models.{label}.threshold must be a number or "
                             f"{{far: 0.001, dataset: NAME}} (optional align, seed), got {spec!r}")
        if not 0 < float(spec["far"]) < 1:
            raise BenchError(f"{path}: models.{label}.threshold.far must be in (0, 1), got {spec['far']}")
        calibration_dataset(spec, data, path)


def calibration_dataset(spec: dict, data: dict, path: Any = "suite") -> tuple[str, dict, bool]:
    """(dataset name, options, align) that a ``threshold: {far, dataset}`` spec names."""
    ref = spec["dataset"]
    if isinstance(ref, dict):
        if "dataset" not in ref:
            raise BenchError(f"{path}: threshold.dataset mapping needs 'dataset' (a registered dataset)")
        # every key but dataset/align is the dataset's own (identity-list's pairs included)
        opts = {k: v for k, v in ref.items() if k not in ("dataset", "align")}
        return ref["dataset"], opts, bool(spec.get("align", ref.get("align", True)))
    if data.get("dataset") == ref:
        name, opts = dataset_options(data)
        return name, opts, bool(spec.get("align", data.get("align", True)))
    raise BenchError(f"{path}: threshold.dataset {ref!r} is not the suite's data.dataset "
                     f"({data.get('dataset')!r}); name it as a mapping {{dataset: {ref}, root: ...}}")


def with_threshold(cell: Cell, model) -> tuple[Any, dict | None]:
    """A view of ``model`` (shared weights) with the cell's threshold, and where it came
    from (``model`` itself and None when the suite keeps the model's own)."""
    if "threshold" not in cell.model_options:
        return model, None
    spec = cell.model_options["threshold"]
    view = copy.copy(model)  # shallow: same parameters; the threshold is the view's own
    if isinstance(spec, (int, float)):
        view.threshold = float(spec)
        return view, {"value": float(spec), "source": "fixed in the suite"}
    data = data_spec.resolve(cell.data, cell.root)
    name, opts, align = calibration_dataset(spec, data)
    opts = data_spec.resolve_mapping(opts, name, cell.root)
    model_opts = {k: v for k, v in factory_options(cell.model_options).items() if k != "threshold"}
    rec = cached_calibration(model, cell.model, model_opts, name, opts, float(spec["far"]), align=align,
                             device=cell.device, seed=int(spec.get("seed", 0)), progress=False,
                             drop_no_face=bool(data.get("drop_no_face", False)))
    view.threshold = float(rec["threshold"])
    lo, hi = rec["threshold_ci95"]
    return view, {"value": rec["threshold"], "ci95": [lo, hi], "far_target": rec["far_target"],
                  "far": rec["far"], "tar": rec["tar"], "dataset": name, "impostor_pairs": rec["impostor_pairs"],
                  "source": f"calibrated to FAR {rec['far_target']:g} on {rec['impostor_pairs']} clean impostor "
                            f"pairs of {name} (95% bootstrap [{lo:.4g}, {hi:.4g}]; clean TAR "
                            f"{100 * rec['tar']['value']:.1f}%)"}
