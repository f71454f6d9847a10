"""Known against unknown randomness through IWMF, and the attack on the majority vote.

    python benchmarks/known_randomness.py [--pairs 20] [--eps 0.004 0.008 0.03] [--steps 40]
                                          [--defenses iwmf-0.25 iwmf-0.5] [--majority-eps 0.008]
                                          [--results results/bench-known]

On dlib-resnet with the paper's pairs aligned as the suites align them, exact gradients,
APGD with EOT over 10 draws per step and 40 steps in both columns, so the same gradient
evaluations: with unknown randomness (the attack draws its own windows) and with known
randomness (``randomness: known``: every step's 10 draws are the scorer's, so IWMF is a
fixed function to the attacker), the latter also scored on fresh draws. Then, at
``--majority-eps``, ``majority-eot`` (the k-th best draw of each vote of 10) against the
unknown-randomness APGD-EOT, both scored by the majority deployment. Every rate is a
suite cell's single-shot FAR over 10 purifications (95% Wilson interval over pairs) with
its majority-vote FAR beside it.
"""

from __future__ import annotations

import argparse

from tabulate import tabulate

from bench_suite import DEFENSES, budgets, label_at, machine_line, run_suite
from iwmf_bench.pipeline.outcome import metrics_of


def threats(eps: list[float], steps: int, majority_eps: list[float]) -> dict[str, str]:
    common = f"setting: adaptive, norm: Linf, steps: {steps}, eot_iter: 10, grad_mode: exact"
    out = {"unknown": f"{{attack: apgd, eps: {budgets(eps)}, {common}}}",
           "known": f"{{attack: apgd, eps: {budgets(eps)}, {common}, randomness: known}}"}
    if majority_eps:
        out["majority-eot"] = f"{{attack: majority-eot, eps: {budgets(majority_eps)}, vote: 10, {common}}}"
    return out


def pct(rate) -> str:
    return f"{100 * rate.value:.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--eps", type=float, nargs="+", default=[0.004, 0.008, 0.03])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--defenses", nargs="+", default=["iwmf-0.25", "iwmf-0.5"], choices=sorted(DEFENSES))
    p.add_argument("--majority-eps", type=float, nargs="*", default=[0.008])
    p.add_argument("--results", default="results/bench-known")
    args = p.parse_args()
    records = run_suite("bench-known", args.pairs, args.defenses, threats(args.eps, args.steps, args.majority_eps),
                        args.results)
    cell = lambda d, t, eps, all_eps: metrics_of(records[f"dlib-resnet/{d}/{label_at(t, eps, all_eps)}"])  # noqa: E731
    rows = []
    for d in args.defenses:
        for eps in sorted(args.eps):
            u, k = cell(d, "unknown", eps, args.eps), cell(d, "known", eps, args.eps)
            fresh = k.fresh_draws
            rows.append([d, f"{eps:g}", str(u.success), pct(u.deployment("majority").success), str(k.success),
                         pct(k.deployment("majority").success), str(fresh["single-shot"]), pct(fresh["majority"]),
                         f"{100 * (k.success.value - u.success.value):+.1f}"])
    print(f"# known vs unknown randomness, dlib-resnet, {args.pairs} pairs, APGD {args.steps} steps x EOT 10 "
          f"(equal gradient evaluations), exact gradients; {machine_line()}")
    print(tabulate(rows, headers=["defense", "eps", "unknown FAR", "majority", "known FAR", "majority",
                                  "known, fresh draws", "majority", "known - unknown"], tablefmt="github",
                   disable_numparse=True))
    if args.majority_eps:
        rows = []
        for d in args.defenses:
            for eps in sorted(args.majority_eps):
                u = cell(d, "unknown", eps, args.eps)
                m = cell(d, "majority-eot", eps, args.majority_eps)
                rows.append([d, f"{eps:g}", pct(u.deployment("majority").success), str(u.success),
                             pct(m.deployment("majority").success), str(m.success)])
        print(f"\n# the majority vote attacked: APGD-EOT (EOT 10) vs majority-eot (votes of 10), {args.steps} steps")
        print(tabulate(rows, headers=["defense", "eps", "APGD-EOT majority FAR", "single-shot", "majority-eot majority FAR",
                                      "single-shot"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
