"""Seconds per batch of IWMF: ours vs the straightforward sequential loop, side by side.

    python benchmarks/iwmf.py [--device cpu|cuda] [--repeats 5] [--quick]

Columns: `ours` is `iwmf_apply` as a defense runs it (forward only, no gradient);
`ours+grad` is one forward AND one backward (`torch.autograd.grad` of the output
against a fixed random cotangent), what an adaptive attacker pays per step; `fwd+bwd/fwd`
is their ratio (the backward runs the forward kernel on the reversed windows, so about
2); `loop` is the definition applied window by window with torch slicing, one image at a
time (every image has its own window sequence), forward only. All get the same windows.
`--quick` times the loop on at most 4 images and scales by the batch size (the loop is
exactly linear in the number of images); the table says when it did.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tabulate import tabulate

from iwmf_bench.defenses.iwmf import draw_centres, iwmf_apply


def loop_iwmf(x: torch.Tensor, centres: torch.Tensor, s: int) -> torch.Tensor:
    out = x.clone()
    for b in range(x.shape[0]):
        for r, c in centres[b].tolist():
            r0, c0 = r - s // 2, c - s // 2
            out[b, :, r0:r0 + s, c0:c0 + s] = out[b, :, r0:r0 + s, c0:c0 + s].mean(dim=(1, 2), keepdim=True)
    return out


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (numba cache load, allocator)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="time the loop on <= 4 images and scale")
    ap.add_argument("--s", type=int, default=3)
    args = ap.parse_args()
    s, rows = args.s, []
    for batch in (1, 20, 100):
        for size in (112, 160):
            for lam in (0.25, 0.5):
                g = torch.Generator().manual_seed(0)
                x = torch.rand(batch, 3, size, size, generator=g).to(args.device)
                centres = draw_centres(batch, size, size, int(lam * size * size), s, g)
                ours = timed(lambda: iwmf_apply(x, centres, s), args.repeats, args.device)
                xg = x.clone().requires_grad_(True)
                cotangent = torch.randn(x.shape, generator=g).to(args.device)
                grad = timed(lambda: torch.autograd.grad(iwmf_apply(xg, centres, s), xg, cotangent),
                             args.repeats, args.device)
                k = min(batch, 4) if args.quick else batch
                loop = timed(lambda: loop_iwmf(x[:k], centres[:k], s), 1, args.device) * batch / k
                rows.append([batch, size, lam, f"{ours:.4f}", f"{grad:.4f}", f"{grad / ours:.2f}",
                             f"{loop:.3f}" + ("*" if k < batch else ""), f"{loop / ours:.0f}x"])
    print(f"IWMF, s={s}, device={args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} runs, seconds per batch")
    print(tabulate(rows, headers=["batch", "HxW", "lambda_0", "ours", "ours+grad (fwd+bwd)", "fwd+bwd/fwd",
                                  "loop (fwd)", "loop/ours"], tablefmt="github"))
    if args.quick:
        print("* loop timed on 4 images and scaled by batch/4")


if __name__ == "__main__":
    main()
