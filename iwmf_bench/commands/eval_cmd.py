"""``iwmf-bench eval``: FAR and FRR of a face model over all pairs between two folders."""

from __future__ import annotations

import json

import torch

from .. import metrics, registry
from ..data import load_folder
from ..models.base import frozen


def register(sub):
    p = sub.add_parser("eval", help="FAR/FRR of a model over all pairs between two image folders")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None, help="local checkpoint for the model")
    p.add_argument("--input", required=True, help="probe images (NNNNN_label.ext)")
    p.add_argument("--references", required=True, help="reference images (NNNNN_label.ext)")
    p.add_argument("--threshold", type=float, default=None, help="default: the model's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    kwargs = {"weights": args.weights} if args.weights else {}
    model = frozen(registry.create("models", args.model, **kwargs), args.device)
    probes = load_folder(args.input, size=model.input_size)
    refs = load_folder(args.references, size=model.input_size)
    with torch.no_grad():
        a = model.embed(probes.images.to(args.device)).cpu()
        b = model.embed(refs.images.to(args.device)).cpu()
    thr = model.threshold if args.threshold is None else args.threshold
    same_folder = probes.root.resolve() == refs.root.resolve()
    s = metrics.pair_scores(a, b, model.metric)
    rates = metrics.far_frr(s, probes.labels, refs.labels, thr, model.metric, exclude_self=same_folder)
    if args.json:
        print(json.dumps({"model": args.model, "metric": model.metric, "threshold": thr,
                          **{k: v.to_dict() for k, v in rates.items()}}, indent=2))
    else:
        print(f"{args.model} ({model.metric}, threshold {thr:g}): FAR {rates['far']}  FRR {rates['frr']}")
    return 0
