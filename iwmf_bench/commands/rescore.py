"""``iwmf-bench rescore``: score a folder of adversarial images as a cell scores its own.

A run keeps the 8-bit images every cell scored (``results/<suite>/images/``, named in
each cell record's ``adversarial_images``). Re-scoring them runs the cell's defense on
the same draws and seed and must give the record's numbers bit for bit; pointed at images
made by another tool (one PNG per pair, ``NNNNN_label.png`` by pair index, at the model's
aligned size), it scores those instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import BenchError
from ..pipeline.compute import images_dir, rescore_cell
from ..pipeline.record import ResultStore
from .run import add_suite_options, load_checked_suite

# What a re-score reproduces of a cell's record: everything computed from the images.
COMPARED = ("far", "far_worst_of_n", "dodging_success", "dodging_success_worst_of_n", "frr_genuine",
            "frr_adv_true_identity", "per_pair")
# Per-pair facts of the attack itself, which images do not carry.
ATTACK_FACTS = ("queries", "min_eps")


def register(sub):
    p = sub.add_parser("rescore", help="score saved (or any tool's) adversarial images as a cell does")
    p.add_argument("cell", help="MODEL/DEFENSE/THREAT, as in the leaderboard (e.g. dlib-resnet/jpeg-50/apgd-linf-transfer)")
    p.add_argument("--images", default=None,
                   help="folder of PNGs, one per pair, NNNNN_label.png by pair index (default: the images the "
                   "run saved for this cell under --results)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_suite_options(p, executor=False)
    p.set_defaults(func=rescore)


def reproduced(record: dict, metrics: dict) -> list[str]:
    """The metrics of ``record`` that ``metrics`` does not reproduce exactly."""
    old = record.get("metrics") or {}
    from_images = lambda m: {k: v for k, v in (m or {}).items() if k not in ATTACK_FACTS}  # noqa: E731
    return [k for k in COMPARED if k in old and (from_images(old[k]) != from_images(metrics.get(k))
                                                 if k == "per_pair" else old[k] != metrics.get(k))]


def rescore(args) -> int:
    suite = load_checked_suite(args.config)
    cells = {c.name: c for c in suite.cells()}
    if args.cell not in cells:
        raise BenchError(f"{args.cell!r} is not a cell of suite {suite.name}; cells are MODEL/DEFENSE/THREAT, "
                         f"e.g. {next(iter(cells))}")
    cell = cells[args.cell]
    folder = Path(args.images) if args.images else images_dir(cell, args.results)
    if not folder.is_dir():
        raise BenchError(f"{folder}: no saved images for {cell.name}; run the cell first (iwmf-bench run "
                         f"--config {args.config} --models {cell.model} --defenses {cell.defense} --attacks "
                         f"{cell.threat}) or pass --images DIR")
    metrics = json.loads(json.dumps(rescore_cell(cell, folder).to_dict()))  # as a record stores them
    record = ResultStore(args.results, suite.name).load(cell) if not args.images else None
    if args.json:
        print(json.dumps(metrics, indent=1))
    rate = "far" if "far" in metrics else "dodging_success"
    for name in (rate, f"{rate}_worst_of_n", "frr_adv_true_identity"):
        r = metrics[name]
        before = f"   (record: {100 * record['metrics'][name]['value']:.1f}%)" if record else ""
        print(f"{name}: {r['k']:g}/{r['n']} = {100 * r['value']:.1f}%{before}", file=sys.stderr if args.json else sys.stdout)
    if record is not None:
        differ = reproduced(record, metrics)
        if differ:
            print(f"rescore: {cell.name}: differs from its record in {', '.join(differ)}", file=sys.stderr)
            return 1
        print(f"rescore: {cell.name}: the record's numbers reproduced bit for bit ({', '.join(k for k in COMPARED if k in metrics)})",
              file=sys.stderr if args.json else sys.stdout)
    return 0
