"""Which of Square's settings makes it strong: ``p_init`` or no stop on success, or both.

    python benchmarks/square_settings.py [--pairs 20] [--queries 1000] [--eps 0.03]
                                         [--lambda-0 0.25] [--s 3] [--draws 10]
                                         [--blocks transfer adaptive] [--adaptive-eot 2]
                                         [--settings ours p-init no-stop paper]

Our Square (``iwmf_bench.attacks.square``) at four settings, on dlib-resnet with the
shared pairs aligned as the suites align them (source ``i`` impersonates target ``i``):

* ``p_init`` 0.05, stop on success (our earlier default: the Square paper's Linf value and early stop);
* ``p_init`` 0.8 only;
* no stop only (every image is pushed for the whole budget, raising its margin);
* ``p_init`` 0.8 and no stop (today's default; the IWMF paper's code:
  ``SquareAttack(..., thres=1)``, which never counts a success, with the class default
  ``p_init`` 0.8).

Transfer block (the suites' ``square-linf-transfer``): each setting crafts on the
undefended model once; the same images are scored undefended and through IWMF
(``--lambda-0``, ``--s``) on ``--draws`` fresh purifications each. The adaptive block
(``--blocks adaptive``, or both) runs each setting with IWMF in the loop (each loss estimate averaged over
``--adaptive-eot`` draws, as ``square-linf-adaptive`` does) and scores through IWMF the
same way. Columns: FAR single-shot of the saved 8-bit images with its 95% Wilson
interval (per image over the draws; see ``metrics.Rate``), worst-of-N through IWMF,
median dlib distance to the target (threshold 0.6) through IWMF, queries per image and
seconds.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from iwmf_bench import registry
from iwmf_bench.scoring import evaluate
from iwmf_bench.attacks.base import AttackTask
from iwmf_bench.attacks.square import Square
from iwmf_bench.defenses.iwmf import IWMF
from iwmf_bench.models.base import frozen
from iwmf_bench.pipeline.folder_pairs import folder_pairs  # the paper's pairs, aligned as a suite cell aligns them

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "iwmfdiff-imgs"

#: name -> (row label, Square keywords besides norm, eps, queries).
SETTINGS = {
    "ours": ("p_init 0.05, stop on success (earlier default)", {"p_init": 0.05, "stop_on_success": True}),
    "p-init": ("p_init 0.8 only", {"p_init": 0.8, "stop_on_success": True}),
    "no-stop": ("no stop only (p_init 0.05)", {"p_init": 0.05, "stop_on_success": False}),
    "paper": ("p_init 0.8 + no stop (paper's)", {"p_init": 0.8, "stop_on_success": False}),
}


def shared_pairs(sources: str, targets: str, pairs: int, model_name: str, input_size: int):
    """Sources and targets aligned for ``model_name``, source ``i`` against target ``i``."""
    data = folder_pairs(sources, targets, True, pairs, model_name, input_size)
    return data.sources, data.targets


def scored_row(label, model, adv, refs, defense, seed, draws, queries, seconds):
    """One table row: FAR undefended, FAR through ``defense`` (single-shot, worst-of-N)."""
    bare = evaluate(model, None, adv, refs, seed)
    ev = evaluate(model, defense, adv, refs, seed, n_draws=draws)
    distance = model.threshold - ev.margin  # dlib: margin = threshold - Euclidean distance
    return [label, str(bare.single_shot), str(ev.single_shot), str(ev.worst_of_n),
            f"{statistics.median(distance.flatten().tolist()):.3f}", f"{queries:.0f}", f"{seconds:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=0.03)
    ap.add_argument("--lambda-0", type=float, default=0.25)
    ap.add_argument("--s", type=int, default=3)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--blocks", nargs="+", choices=["transfer", "adaptive"], default=["transfer"],
                    help="transfer: crafted on the undefended model; adaptive: with IWMF in the loop")
    ap.add_argument("--adaptive-eot", type=int, default=2)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                    help="which settings to run (default: all four); each is seeded alike, so a "
                    "setting run alone gives its row of the full run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", default=str(SHARED / "source"))
    ap.add_argument("--targets", default=str(SHARED / "target"))
    args = ap.parse_args()
    started = time.perf_counter()
    model = frozen(registry.create("models", "dlib-resnet"))
    x, targets = shared_pairs(str(Path(args.sources).resolve()), str(Path(args.targets).resolve()), args.pairs,
                              "dlib-resnet", model.input_size)
    with torch.no_grad():
        refs = model.embed(targets)
    iwmf = IWMF(lambda_0=args.lambda_0, s=args.s)
    clean = scored_row("clean (no attack)", model, x, refs, iwmf, args.seed, args.draws, 0, 0)
    headers = ["Square setting", "FAR undefended", f"FAR through IWMF {args.lambda_0} (s {args.s})",
               "worst-of-N through IWMF", "median distance (IWMF)", "queries/img", "seconds"]
    blocks = []
    if "transfer" in args.blocks:
        blocks.append(("transfer: crafted on the undefended model", None, 1))
    if "adaptive" in args.blocks:
        blocks.append((f"adaptive: IWMF in the loop, EOT {args.adaptive_eot}", iwmf, args.adaptive_eot))
    rows = [clean]
    print(" | ".join(clean), flush=True)
    for title, in_loop, eot in blocks:
        rows.append([title, "", "", "", "", "", ""])
        for name in args.settings:
            label, options = SETTINGS[name]
            attack = Square(norm="Linf", eps=args.eps, queries=args.queries, eot_iter=eot, **options)
            start = time.perf_counter()
            result = attack.run(AttackTask(model, x, refs, defense=in_loop, seed=args.seed))
            seconds = time.perf_counter() - start
            rows.append(scored_row(f"  {label}", model, result.adversarial, refs, iwmf, args.seed, args.draws,
                                   float(result.queries.float().mean()), seconds))
            print(" | ".join(rows[-1]), flush=True)
    print(f"\ndlib-resnet, {args.pairs} shared pairs (aligned), Linf {args.eps}, {args.queries} queries, "
          f"seed {args.seed}; {args.draws} fresh purifications per image; "
          f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, {time.perf_counter() - started:.0f} s in all")
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
