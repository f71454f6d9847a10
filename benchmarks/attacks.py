"""Our APGD and Square vs the reference implementations (AutoAttack's APGD-CE and Square,
through the verification adapter), side by side in one run, on dlib-resnet.

    python benchmarks/attacks.py [--pairs 20] [--steps 40] [--queries 1000] [--eps 0.03 0.01 0.005]
                                 [--iwmf-steps 40] [--iwmf-queries 1000] [--eot 5] [--lambda-0 0.25]

Needs the [suites] extra (pyautoattack). Source ``i`` impersonates target ``i`` of the
shared images (aligned for dlib-resnet). Two blocks: undefended (the attacks see the bare
model; Linf), then IWMF in the loop (adaptive; exact gradients, EOT over ``--eot`` draws
for the APGDs, ``--eot`` draws per query for our Square; AutoAttack's Square queries one
draw each). Square runs at equal queries per image. Columns: FAR of the saved (8-bit)
images, single-shot over 10 fresh purifications for IWMF, with its 95% Wilson interval;
median final distance (dlib's Euclidean distance to the target's embedding, over pairs
and draws; the threshold is 0.6); seconds for the attack; queries per image.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from iwmf_bench import registry
from iwmf_bench.align import align_folder
from iwmf_bench.scoring import evaluate
from iwmf_bench.attacks.apgd import APGD
from iwmf_bench.attacks.autoattack import AutoAttack
from iwmf_bench.attacks.base import AttackTask
from iwmf_bench.attacks.square import Square
from iwmf_bench.data import load_folder
from iwmf_bench.defenses.iwmf import IWMF
from iwmf_bench.models.base import frozen

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "iwmfdiff-imgs"


def aligned_pairs(pairs: int, root: Path):
    for kind in ("source", "target"):
        raw = root / f"raw-{kind}"
        raw.mkdir(parents=True)
        for path in sorted((SHARED / kind).iterdir())[:pairs]:
            shutil.copy(path, raw / path.name)
        align_folder(raw, root / kind, model="dlib-resnet")
    return load_folder(root / "source"), load_folder(root / "target")


def row(label, attack, model, src, refs, defense, seed):
    start = time.perf_counter()
    result = attack.run(AttackTask(model, src, refs, defense=defense, seed=seed))
    seconds = time.perf_counter() - start
    ev = evaluate(model, defense, result.adversarial, refs, seed, n_draws=10)
    distance = model.threshold - ev.margin  # Euclidean distance (margin = threshold - distance)
    return [label, str(ev.single_shot), f"{statistics.median(distance.flatten().tolist()):.3f}", f"{seconds:.0f}",
            f"{float(result.queries.float().mean()):.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.01, 0.005])
    ap.add_argument("--iwmf-steps", type=int, default=40)
    ap.add_argument("--iwmf-queries", type=int, default=1000)
    ap.add_argument("--iwmf-eps", type=float, nargs="+", default=None, help="default: --eps")
    ap.add_argument("--eot", type=int, default=5)
    ap.add_argument("--lambda-0", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    model = frozen(registry.create("models", "dlib-resnet"))
    with tempfile.TemporaryDirectory() as tmp:
        src, tgt = aligned_pairs(args.pairs, Path(tmp))
    x = src.images
    with torch.no_grad():
        refs = model.embed(tgt.images)
    clean = evaluate(model, None, x, refs, args.seed)
    rows = []
    for eps in args.eps:
        rows.append([f"undefended, Linf {eps}", "", "", "", ""])
        for label, attack in (
                (f"  ours apgd ({args.steps} steps)", APGD(eps=eps, steps=args.steps)),
                (f"  autoattack apgd-ce ({args.steps} steps)", AutoAttack(eps=eps, attacks=["apgd-ce"],
                                                                           steps=args.steps)),
                (f"  ours square ({args.queries} q)", Square(eps=eps, queries=args.queries)),
                (f"  autoattack square ({args.queries} q)", AutoAttack(eps=eps, attacks=["square"],
                                                                       queries=args.queries))):
            rows.append(row(label, attack, model, x, refs, None, args.seed))
            print(" | ".join(rows[-1]), flush=True)
    iwmf = IWMF(lambda_0=args.lambda_0)
    for eps in args.iwmf_eps or args.eps:
        rows.append([f"IWMF {args.lambda_0} in the loop, Linf {eps}", "", "", "", ""])
        e = args.eot
        for label, attack in (
                (f"  ours apgd exact EOT {e} ({args.iwmf_steps} steps)",
                 APGD(eps=eps, steps=args.iwmf_steps, eot_iter=e, grad_mode="exact")),
                (f"  autoattack apgd-ce rand EOT {e} ({args.iwmf_steps} steps)",
                 AutoAttack(eps=eps, attacks=["apgd-ce"], steps=args.iwmf_steps, eot_iter=e, grad_mode="exact")),
                (f"  ours square EOT {e} ({args.iwmf_queries} q)", Square(eps=eps, queries=args.iwmf_queries,
                                                                           eot_iter=e)),
                (f"  autoattack square ({args.iwmf_queries} q)", AutoAttack(eps=eps, attacks=["square"],
                                                                            queries=args.iwmf_queries))):
            rows.append(row(label, attack, model, x, refs, iwmf, args.seed))
            print(" | ".join(rows[-1]), flush=True)
    print(f"\ndlib-resnet, {args.pairs} shared pairs, seed {args.seed}; clean FAR {clean.single_shot}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(tabulate(rows, headers=["attack", "FAR % [95% CI] (k/n)", "median distance", "seconds", "queries/img"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
