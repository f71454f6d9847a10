"""Thresholds calibrated to a target FAR on a dataset's clean impostor pairs.

``calibrate`` streams the dataset's pair images (aligned through the disk cache of
:mod:`.align_cache`, or resized) through the model in batches, scores every protocol
pair, and picks the threshold accepting floor(FAR x impostor pairs) impostors, with a
seeded bootstrap interval. Results are small JSON files under
``$IWMF_BENCH_CACHE/calibration/``, keyed by model, dataset, FAR, alignment, seed and
package version, so a suite calibrates each model once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from . import __version__, roc
from .align_cache import AlignedImages, cache_root
from .datasets import Dataset, DatasetError, Pair, open_dataset
from .metrics import scores as index_scores
from .models.base import resize
from .util import write_json_atomic


def image_batches(dataset: Dataset, model, indices: Sequence[int], align: bool, device: str = "cpu",
                  batch: int = 64, progress: bool = True):
    """(indices, images on ``device``, found-a-face mask) in batches, aligned to the
    model's template (cached) or resized to its input size."""
    if align:
        aligned = AlignedImages(dataset, model.name if hasattr(model, "name") else str(model), device=device,
                                progress=progress)
        for chunk, crops, ok in aligned.batches(indices, batch):
            yield chunk, crops.to(device), ok
    else:
        for chunk, images in dataset.iter_images(indices, batch):
            x = torch.stack([resize(img.unsqueeze(0), model.input_size)[0] for img in images])
            yield chunk, x.to(device), torch.ones(len(chunk), dtype=torch.bool)


@torch.no_grad()
def embed_images(dataset: Dataset, model, indices: Sequence[int], align: bool, device: str = "cpu",
                 batch: int = 64, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (n, D) on the CPU of ``indices`` (in that order) and the face-found mask."""
    embs, oks = [], []
    bar = tqdm(total=len(indices), desc=f"embed {model.name}", unit="img", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for chunk, x, ok in image_batches(dataset, model, indices, align, device, batch, progress):
        embs.append(model.embed(x).cpu())
        oks.append(ok)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(embs), torch.cat(oks)


def score_pairs(dataset: Dataset, model, pairs: Sequence[Pair], align: bool, device: str = "cpu",
                batch: int = 64, progress: bool = True, drop_no_face: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scores of ``pairs`` (model metric), their is-genuine mask, and how many pairs were
    dropped because an image had no detectable face (an error unless ``drop_no_face``)."""
    used = sorted({p.a for p in pairs} | {p.b for p in pairs})
    emb, ok = embed_images(dataset, model, used, align, device, batch, progress)
    row = {i: j for j, i in enumerate(used)}
    a = torch.tensor([row[p.a] for p in pairs], dtype=torch.long)
    b = torch.tensor([row[p.b] for p in pairs], dtype=torch.long)
    keep = ok[a] & ok[b]
    dropped = int((~keep).sum())
    if dropped and not drop_no_face:
        bad = [dataset.names[used[j]] for j in range(len(used)) if not ok[j]]
        raise DatasetError(f"no face found in {len(bad)} image(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                           f"used by {dropped} pair(s); pass drop_no_face (--drop-no-face) to leave those pairs "
                           "out (the count is reported), or align: false for pre-aligned images")
    same = torch.tensor([p.same for p in pairs], dtype=torch.bool)
    s = index_scores(emb[a[keep]], emb[b[keep]], model.metric)
    return s, same[keep], dropped


def calibrate(dataset: Dataset, model, far: float, align: bool = True, device: str = "cpu", seed: int = 0,
              resamples: int = 1000, progress: bool = True, drop_no_face: bool = False) -> dict[str, Any]:
    """Threshold at ``far`` on the clean impostor pairs, its bootstrap interval, TAR there."""
    pairs = dataset.pairs()
    n_imp = sum(not p.same for p in pairs)
    if n_imp == 0:
        raise DatasetError("the dataset has no impostor pairs to calibrate on")
    roc.check_far(far, n_imp)  # fail before embedding anything
    s, same, dropped = score_pairs(dataset, model, pairs, align, device, progress=progress, drop_no_face=drop_no_face)
    genuine, impostor = s[same], s[~same]
    t = roc.threshold_at_far(impostor, far, model.metric)
    lo, hi = roc.bootstrap_threshold(impostor, far, model.metric,
                                     torch.Generator().manual_seed(int(seed)), resamples=resamples)
    rates = roc.rates_at(genuine, impostor, t, model.metric)
    return {"threshold": t, "threshold_ci95": [lo, hi], "far_target": far, "metric": model.metric,
            "far": rates["far"].to_dict(), "tar": rates["tar"].to_dict(),
            "genuine_pairs": int(genuine.numel()), "impostor_pairs": int(impostor.numel()),
            "dropped_pairs_no_face": dropped, "align": bool(align), "seed": int(seed),
            "bootstrap_resamples": int(resamples), "version": __version__}


def calibration_path(model_name: str, model_options: dict, dataset: str, dataset_options: dict, far: float,
                     align: bool, seed: int, resamples: int = 1000, root: str | Path | None = None) -> Path:
    blob = json.dumps({"model": model_name, "model_options": model_options, "dataset": dataset,
                       "dataset_options": dataset_options, "far": far, "align": bool(align), "seed": int(seed),
                       "resamples": int(resamples), "version": __version__}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(root or cache_root()) / "calibration" / f"{model_name}-{dataset}-far{far:g}-{key}.json"


def cached_calibration(model, model_name: str, model_options: dict, dataset: str, dataset_options: dict,
                       far: float, align: bool = True, device: str = "cpu", seed: int = 0, resamples: int = 1000,
                       progress: bool = True, drop_no_face: bool = False) -> dict[str, Any]:
    """:func:`calibrate` once per (model, dataset, FAR, alignment, seed, version); the
    JSON record (with the model and dataset named) is reused afterwards."""
    path = calibration_path(model_name, model_options, dataset, dataset_options, far, align, seed, resamples)
    if path.is_file():
        return {**json.loads(path.read_text()), "path": str(path)}
    ds = open_dataset(dataset, **dataset_options)
    record = {"model": model_name, "model_options": model_options, "dataset": dataset,
              "dataset_options": ds.options,
              **calibrate(ds, model, far, align, device, seed, resamples, progress, drop_no_face)}
    write_json_atomic(path, record)
    return {**record, "path": str(path)}
