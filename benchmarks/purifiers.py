"""Time per image of every registered defense: forward, and forward+backward per gradient mode.

    .venv/bin/python benchmarks/purifiers.py [--defenses iwmf,median] [--repeats 5]
        [--paper-repeats 2] [--batches 1,20] [--size 160] [--device cpu] [--threads N]

Every defense in the registry is built with its default options and times, on a random
batch of ``size x size`` RGB images, for each batch size:

* ``fwd``: ``purify(x, generator, grad_mode="none")``;
* ``bpda`` / ``exact`` (only the modes the defense declares): one ``purify`` with that
  gradient mode AND one backward (``torch.autograd.grad`` against a fixed random
  cotangent), what an adaptive attacker pays per step.

Each cell is ``median (min)`` milliseconds per image over ``--repeats`` timed calls after one
warm-up call. The diffusion defenses need checkpoints and a GPU (see
``benchmarks/diffusion.py``) and are skipped; a defense whose plugin failed to load, or
that fails to build or run, gets a "not available" row naming the error.

IWMF is also timed against the paper's reference semantics (github.com/azrealwang/iwmfdiff,
``functions/defense.py``): one window sequence shared by the whole batch, each window
applied with tensor slicing in a Python loop. Here the centres are drawn up front (the
paper's loop also draws its two random integers per window with numpy; leaving that out
can only flatter the paper's code), and its ``exact`` column is autograd through that
loop. Our row with ``shared=True`` (``iwmf_apply``) computes the same function (the
script checks this); both are timed as bare functions on the same pre-drawn centres (no
input check, no drawing), and the speed-up row divides the paper's medians by ours.
Autograd through thousands of in-place slice assignments costs several full-image passes
per window in the backward (seconds per batch of 20), so the paper's loop is timed
``--paper-repeats`` times (default 2) after its warm-up.

With ``--device cuda`` (and Triton importable) IWMF runs the fused Triton kernel, and the
table adds the torch dependency-level kernel it replaced, for the defense's per-image
windows and for the shared windows against the paper's loop, with the speed-ups.

TVM is also timed with its iterations as torch operations (what runs on a GPU, and ran
on the CPU before the compiled solver) on the same masks, and the speed-up of the
compiled solver over them (the script checks that both compute the same function).

On a shared machine, ``--threads 1`` avoids the stalls of torch's intra-op threads
waiting for a descheduled sibling (which hit the paper's backward hardest).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from tabulate import tabulate

from iwmf_bench import registry
from iwmf_bench.defenses import iwmf_triton
from iwmf_bench.defenses.iwmf import draw_centres, iwmf_apply
from iwmf_bench.defenses.tvm import draw_keep_mask, tv_reconstruct

GRAD_MODES = ("bpda", "exact")
SKIPPED = {
    "diffpure": "needs the CelebA-HQ DDPM checkpoint and a GPU; timed by benchmarks/diffusion.py",
    "iwmfdiff": "needs the CelebA-HQ DDPM checkpoint and a GPU; timed by benchmarks/diffusion.py",
}


def timed(fn, repeats: int, device: str) -> tuple[float, float]:
    """(min, median) seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up (numba cache load, allocator, lazy tables)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def cell(seconds: tuple[float, float], batch: int) -> str:
    """Milliseconds per image, ``median (min)``."""
    best, median = (1e3 * t / batch for t in seconds)
    return f"{median:.3g} ({best:.3g})" if best < 1000 else f"{median:.0f} ({best:.0f})"


def paper_iwmf(x: torch.Tensor, centres: torch.Tensor, s: int) -> torch.Tensor:
    """The paper's reference semantics: one shared window sequence, one slicing
    assignment per window in a Python loop (differentiable through autograd)."""
    out = x.clone()
    for r, c in centres.tolist():
        r0, c0 = r - s // 2, c - s // 2
        out[:, :, r0:r0 + s, c0:c0 + s] = out[:, :, r0:r0 + s, c0:c0 + s].mean(dim=(2, 3), keepdim=True)
    return out


def inputs(batch: int, args):
    """The batch's generator (seeded by the batch size, carried on for its own draws),
    random images and a random cotangent for the backward."""
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, args.size, args.size, generator=g).to(args.device)
    v = torch.randn(x.shape, generator=g).to(args.device)
    return g, x, v


def fwd_bwd(purify, x: torch.Tensor, cotangent: torch.Tensor):
    """A closure timing one differentiable purification plus its backward."""
    xg = x.clone().requires_grad_(True)

    def run():
        out = purify(xg)
        if not out.requires_grad:
            raise RuntimeError("output does not require grad (no gradient flows back)")
        return torch.autograd.grad(out, xg, cotangent)

    return run


def time_defense(defense, batches, args) -> list[list[str]]:
    rows = []
    for batch in batches:
        g, x, v = inputs(batch, args)
        row = [defense.name, batch]
        fwd = timed(lambda: defense.purify(x, torch.Generator().manual_seed(1), "none"), args.repeats, args.device)
        row.append(cell(fwd, batch))
        for mode in GRAD_MODES:
            if mode not in defense.grad_modes:
                row.append("-")
                continue
            purify = lambda t, m=mode: defense.purify(t, torch.Generator().manual_seed(1), m)  # noqa: E731
            try:
                row.append(cell(timed(fwd_bwd(purify, x, v), args.repeats, args.device), batch))
            except Exception as exc:  # report, keep timing the other modes and defenses
                row.append(f"error: {type(exc).__name__}: {exc}"[:80])
        rows.append(row + [""])
        print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def iwmf_kernels(device: str) -> list[str | None]:
    """IWMF kernels to time side by side: on CUDA the Triton kernel (the default there) and
    the torch dependency levels it replaced; elsewhere the default only."""
    if device.startswith("cuda") and iwmf_triton.available():
        return ["triton", "levels"]
    return [None]


def time_paper_iwmf(batches, args) -> list[list[str]]:
    """Ours with shared windows vs the paper's slicing loop, same windows, and the speed-up
    (on CUDA for the Triton kernel and for the torch level kernel)."""
    defaults = registry.get("defenses", "iwmf").factory()
    lam, s = defaults.lambda_0, defaults.s
    rows = []
    for batch in batches:
        g, x, v = inputs(batch, args)
        centres = draw_centres(batch, args.size, args.size, int(lam * args.size ** 2), s, g, shared=True)
        setting = f"lambda_0={lam:g}, s={s}, one window sequence for the batch"
        paper, first = None, len(rows)
        for kernel in iwmf_kernels(args.device):
            def ours_fn(t, k=kernel):
                return iwmf_apply(t, centres, s, kernel=k)

            gap = (ours_fn(x) - paper_iwmf(x, centres, s)).abs().max().item()
            if gap > 1e-5:
                raise SystemExit(f"ours ({kernel or 'default'}) and the paper's loop disagree by {gap:.2e}: "
                                 "not the same function")
            ours = [timed(lambda: ours_fn(x), args.repeats, args.device),
                    timed(fwd_bwd(ours_fn, x, v), args.repeats, args.device)]
            if paper is None:
                paper = [timed(lambda: paper_iwmf(x, centres, s), args.paper_repeats, args.device),
                         timed(fwd_bwd(lambda t: paper_iwmf(t, centres, s), x, v), args.paper_repeats, args.device)]
            label = "iwmf shared=True" + (f", {kernel} kernel" if kernel else "")
            rows.append([label, batch, cell(ours[0], batch), "-", cell(ours[1], batch), setting])
            rows.append([f"{label} speed-up over paper", batch, f"{paper[0][1] / ours[0][1]:.0f}x", "-",
                         f"{paper[1][1] / ours[1][1]:.0f}x", "paper's median / ours median"])
        rows.append(["iwmf, paper's code", batch, cell(paper[0], batch), "-", cell(paper[1], batch),
                     "same windows, slicing loop (Wang et al.'s reference semantics)"])
        for row in rows[first:]:
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def time_iwmf_kernels(batches, args) -> list[list[str]]:
    """On CUDA: the defense's own setting (one window sequence per image) with the torch
    level kernel, beside the defense's row above (Triton), and the Triton speed-up."""
    d = registry.get("defenses", "iwmf").factory()
    rows = []
    for batch in batches:
        g, x, v = inputs(batch, args)
        centres = draw_centres(batch, args.size, args.size, int(d.lambda_0 * args.size ** 2), d.s, g)
        gap = (iwmf_apply(x, centres, d.s, kernel="triton") - iwmf_apply(x, centres, d.s, kernel="levels"))
        if gap.abs().max().item() > 1e-5:
            raise SystemExit(f"IWMF's Triton and torch kernels disagree by {gap.abs().max().item():.2e}")
        times = {}
        for k in ("triton", "levels"):
            times[k] = [timed(lambda: iwmf_apply(x, centres, d.s, kernel=k), args.repeats, args.device),
                        timed(fwd_bwd(lambda t: iwmf_apply(t, centres, d.s, kernel=k), x, v), args.repeats,
                              args.device)]
        rows.append(["iwmf, torch levels kernel", batch, cell(times["levels"][0], batch), "-",
                     cell(times["levels"][1], batch), "per-image windows, what ran on CUDA before Triton"])
        rows.append(["iwmf Triton speed-up over levels", batch,
                     f"{times['levels'][0][1] / times['triton'][0][1]:.1f}x", "-",
                     f"{times['levels'][1][1] / times['triton'][1][1]:.1f}x", "levels median / Triton median"])
        for row in rows[-2:]:
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def time_tvm_torch(batches, args) -> list[list[str]]:
    """TVM's compiled solver vs the same iterations as torch operations, same masks."""
    d = registry.get("defenses", "tvm").factory()
    rows = []
    for batch in batches:
        g, x, v = inputs(batch, args)
        mask = draw_keep_mask(batch, (3, args.size, args.size), d.keep, g).to(args.device)

        def run(t, compiled):
            return tv_reconstruct(t, mask, d.lam, d.iterations, d.eps, compiled=compiled)

        gap = (run(x, True) - run(x, False)).abs().max().item()
        if gap > 1e-4:
            raise SystemExit(f"TVM's compiled solver and its torch iterations disagree by {gap:.2e}")
        timings = {c: [timed(lambda: run(x, c), args.repeats, args.device),
                       timed(fwd_bwd(lambda t: run(t, c), x, v), args.repeats, args.device)] for c in (True, False)}
        setting = f"{d.iterations} iterations, keep {d.keep:g}, same masks"
        rows.append(["tvm, torch iterations", batch, cell(timings[False][0], batch), "-",
                     cell(timings[False][1], batch), setting])
        rows.append(["tvm compiled speed-up", batch, f"{timings[False][0][1] / timings[True][0][1]:.1f}x", "-",
                     f"{timings[False][1][1] / timings[True][1][1]:.1f}x", "torch iterations' median / compiled median"])
        for row in rows[-2:]:
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defenses", default=None, help="comma-separated registry names (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,20")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paper-repeats", type=int, default=2, help="timed runs of the paper's IWMF loop")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    available = registry.available("defenses")
    broken = {b.name: b.error for b in registry.broken("defenses")}
    names = sorted(set(available) | set(broken))
    if args.defenses:
        wanted = [n.strip() for n in args.defenses.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"unknown defenses {', '.join(unknown)}; registered: {', '.join(names)}")
        names = wanted

    rows = []
    for name in names:
        if name in SKIPPED:
            rows.append([name, "-", "-", "-", "-", f"skipped: {SKIPPED[name]}"])
            print(f"{name}: skipped ({SKIPPED[name]})", file=sys.stderr)
            continue
        if name in broken:
            rows.append([name, "-", "-", "-", "-", f"not available: {broken[name]}"[:100]])
            print(f"{name}: not available ({broken[name]})", file=sys.stderr)
            continue
        try:
            defense = available[name].factory().to(args.device)
            rows.extend(time_defense(defense, batches, args))
        except Exception as exc:  # one broken defense must not stop the table
            rows.append([name, "-", "-", "-", "-", f"not available: {type(exc).__name__}: {exc}"[:100]])
            print(f"{name}: not available ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        if name == "iwmf":
            if iwmf_kernels(args.device) != [None]:
                rows.extend(time_iwmf_kernels(batches, args))
            rows.extend(time_paper_iwmf(batches, args))
        if name == "tvm" and args.device == "cpu":
            rows.extend(time_tvm_torch(batches, args))

    print(f"Defenses at {args.size}x{args.size}, device={args.device}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. "
          f"Milliseconds per image, median (min) of {args.repeats} runs after a warm-up "
          f"({args.paper_repeats} for the paper's loop); "
          "bpda/exact = forward + backward.\n")
    print(tabulate(rows, headers=["defense", "batch", "fwd (none)", "fwd+bwd bpda", "fwd+bwd exact", "note"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
