"""``iwmf-bench calibrate``: the threshold giving a target FAR on a dataset's clean
impostor pairs (bootstrap interval), written to a small JSON; prints TAR there."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .. import registry
from ..calibration import cached_calibration
from ..errors import BenchError
from ..models.base import frozen
from ..roc import check_far
from ..util import write_json_atomic

# Common dataset options get their own flags; any other goes through -O KEY=VALUE.
FLAGS = ("root", "pairs_file", "identity_file", "path", "sources", "targets", "ext")


def register(sub):
    p = sub.add_parser("calibrate", help="threshold at a target FAR on a dataset's clean impostor pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None, help="local checkpoint for the model")
    p.add_argument("--dataset", required=True, help="registered dataset: folder, lfw, identity-list, verification-bin")
    p.add_argument("--far", type=float, default=1e-3, help="target false accept rate (default 1e-3)")
    for flag in FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), default=None, help=f"dataset option {flag}")
    p.add_argument("--dataset-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="any other dataset option, VALUE read as YAML (repeatable), e.g. -O pairs=3000")
    p.add_argument("--no-align", action="store_true", help="images are aligned already (resize only)")
    p.add_argument("--drop-no-face", action="store_true", help="leave out pairs with an image where no face is found")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--output", default=None, help="JSON file to write (default: the calibration cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=run)


def dataset_options(args) -> dict:
    opts = {f: getattr(args, f) for f in FLAGS if getattr(args, f) is not None}
    for text in args.dataset_option:
        key, sep, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise BenchError(f"--dataset-option expects KEY=VALUE (e.g. pairs=3000), got {text!r}")
        try:
            opts[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise BenchError(f"--dataset-option {text!r}: VALUE is not valid YAML ({exc})") from None
    return opts


def run(args) -> int:
    if not 0 < args.far < 1:  # before loading anything
        check_far(args.far, 1)
    model_opts = {"weights": args.weights} if args.weights else {}
    model = frozen(registry.create("models", args.model, **model_opts), args.device)
    record = cached_calibration(model, args.model, model_opts, args.dataset, dataset_options(args), args.far,
                                align=not args.no_align, device=args.device, seed=args.seed,
                                resamples=args.resamples, drop_no_face=args.drop_no_face)
    path = Path(record.pop("path"))
    if args.output:
        path = Path(args.output)
        write_json_atomic(path, record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        lo, hi = record["threshold_ci95"]
        tar, far = record["tar"], record["far"]
        print(f"{args.model} on {args.dataset} ({record['impostor_pairs']} impostor, {record['genuine_pairs']} "
              f"genuine pairs): threshold {record['threshold']:.6g} ({record['metric']}; 95% bootstrap "
              f"[{lo:.6g}, {hi:.6g}]) for FAR {args.far:g}: FAR {far['k']}/{far['n']} = {far['value']:.4g}, "
              f"TAR {100 * tar['value']:.2f}% ({tar['k']}/{tar['n']})")
        print(f"wrote {path}")
    return 0
