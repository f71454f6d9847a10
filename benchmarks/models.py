"""Embeddings per second of every registered face model whose weights are available.

    .venv/bin/python benchmarks/models.py [--models faceres,dlib-resnet] [--batches 1,20]
        [--repeats 5] [--threads 2] [--device cpu]

Each model is built with its default options and fed a random batch at its own input
size. ``fwd``: ``model(x)`` under ``no_grad``; ``fwd+bwd``: one forward and one backward to
the input pixels (what an attacker pays per step). Cells are ``median (best)`` images per
second over ``--repeats`` timed calls after one warm-up call. A model whose weights are
missing or whose plugin failed gets a row naming why (e.g. ``iwmf-bench fetch faceres``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tabulate import tabulate

from iwmf_bench import registry
from iwmf_bench.errors import BenchError
from iwmf_bench.models.base import frozen


def rate(fn, batch: int, repeats: int, device: str) -> str:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return f"{batch / statistics.median(times):.1f} ({batch / min(times):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated names (default: all registered)")
    ap.add_argument("--batches", default="1,20")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else list(registry.available("models"))
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in names:
        try:
            model = frozen(registry.create("models", name), args.device)
        except (BenchError, ImportError) as exc:
            rows.append([name, "-", f"not available: {str(exc)[:100]}", ""])
            continue
        for batch in batches:
            x = torch.rand(batch, 3, model.input_size, model.input_size, generator=gen).to(args.device)

            def fwd():
                with torch.no_grad():
                    model(x)

            def fwd_bwd():
                xi = x.clone().requires_grad_(True)
                model(xi).sum().backward()

            rows.append([name, batch, rate(fwd, batch, args.repeats, args.device),
                         rate(fwd_bwd, batch, args.repeats, args.device)])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print(tabulate(rows, headers=["model", "batch", "fwd img/s", "fwd+bwd img/s"]))


if __name__ == "__main__":
    main()
