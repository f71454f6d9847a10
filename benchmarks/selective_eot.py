"""Selective EOT against plain APGD-EOT at an equal number of gradient evaluations.

    python benchmarks/selective_eot.py [--pairs 20] [--eps 0.004 0.008] [--steps 40]
                                       [--eot 5] [--defenses iwmf-0.25 iwmf-0.5 ...]
                                       [--results results/bench-selective]

On dlib-resnet with the paper's pairs aligned as the suites align them, through each random
defense of the default suite, with exact gradients: APGD-EOT (`attack: apgd, setting:
adaptive`) and `selective-eot` with the same steps and draws per step, so the same
(steps + 1) x eot forward and backward passes per image, crafted on the same defense
stream and scored like every suite cell (FAR single-shot over 10 fresh purifications with
its 95% interval, worst-of-10). The cells are ordinary suite cells (cached under
``--results``, keyed by their code), so a rerun prints the table at once.
"""

from __future__ import annotations

import argparse

from tabulate import tabulate

from bench_suite import DEFENSES, budgets, label_at, machine_line, run_suite
from iwmf_bench.pipeline.outcome import metrics_of


def threats(eps: list[float], steps: int, eot: int) -> dict[str, str]:
    common = f"setting: adaptive, norm: Linf, eps: {budgets(eps)}, steps: {steps}, eot_iter: {eot}, grad_mode: exact"
    return {"apgd-eot": f"{{attack: apgd, {common}}}", "selective-eot": f"{{attack: selective-eot, {common}}}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--eps", type=float, nargs="+", default=[0.004, 0.008])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eot", type=int, default=5)
    p.add_argument("--defenses", nargs="+", default=["iwmf-0.25", "iwmf-0.5", "random-resize-pad", "gaussian-0.12"],
                   choices=sorted(DEFENSES))
    p.add_argument("--results", default="results/bench-selective")
    args = p.parse_args()
    records = run_suite("bench-selective", args.pairs, args.defenses, threats(args.eps, args.steps, args.eot),
                        args.results)
    rows = []
    for d in args.defenses:
        for eps in sorted(args.eps):
            row = [d, f"{eps:g}"]
            for threat in ("apgd-eot", "selective-eot"):
                r = records[f"dlib-resnet/{d}/{label_at(threat, eps, args.eps)}"]
                if r["status"] != "ok":
                    row += [r["status"], ""]
                    continue
                m = metrics_of(r)
                row += [str(m.success), f"{m.success_worst_of_n.k}/{m.success_worst_of_n.n}"]
            rows.append(row)
    print(f"# selective EOT vs APGD-EOT, dlib-resnet, {args.pairs} pairs, {args.steps} steps x EOT {args.eot} "
          f"(equal gradient evaluations), exact gradients; {machine_line()}")
    print(tabulate(rows, headers=["defense", "eps", "APGD-EOT FAR", "worst-of-10", "selective FAR", "worst-of-10"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
