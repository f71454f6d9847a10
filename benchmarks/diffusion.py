"""Speed and exact-gradient memory of the diffusion defenses (random UNet weights).

    .venv/bin/python benchmarks/diffusion.py                       # tiny UNet, CPU
    .venv/bin/python benchmarks/diffusion.py --config celeba_hq --device cuda --options-table
    .venv/bin/python benchmarks/diffusion.py --config imagenet_256 --batches 1 --timesteps 2 --skip-memory

``--config`` is any prior in iwmf_bench/priors/ (tiny, tiny_adm, celeba_hq, cifar10,
imagenet_256) or a path to a prior YAML.

Table 1: seconds per image of DiffPure and IWMF-Diff (``grad_mode="none"``) for each
batch size. With ``--options-table``, IWMF-Diff under each dtype / channels_last /
torch.compile variant against fp32 in the same run. Last table: memory of one
``grad_mode="exact"`` forward + backward against the number of DDRM steps, with per-step
activation checkpointing (the default) and without. Each memory setting runs in a fresh
subprocess and reports (a) the bytes autograd saves for backward (exact and deterministic,
counted with saved-tensor hooks) and (b) the peak: ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the resident-set high-water mark (``getrusage``) minus its value once the
model and inputs exist, which allocator reuse makes noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from tabulate import tabulate

from iwmf_bench.defenses.diffusion import DiffPure, IWMFDiff, build_unet, load_prior_config


def make(cls, args, **kw):
    options = {"dtype": args.dtype, "channels_last": args.channels_last, "compile": args.compile, **kw}
    d = cls(config=args.config, pretrained=False, timesteps=args.timesteps, **options)
    d = d.to(args.device)
    d.load_model()
    return d


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_seconds(d, batch: int, args) -> float:
    """Best of ``args.repeats`` timed purifications of one batch, after a warm-up."""
    res = d.prior.resolution
    x = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(args.device)
    d.purify(x, torch.Generator().manual_seed(1))  # warm-up (allocations, compile, autotuning)
    sync(args.device)
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        d.purify(x, torch.Generator().manual_seed(2 + r))
        sync(args.device)
        times.append(time.perf_counter() - start)
    return min(times)


def speed(args) -> list[list]:
    rows = []
    for cls in (DiffPure, IWMFDiff):
        for batch in args.batches:
            best = best_seconds(make(cls, args, batch_size=batch), batch, args)
            rows.append([cls.registered_name, batch, args.timesteps, f"{best:.3f}", f"{best / batch:.4f}"])
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# The speed options side by side, each against the same run's fp32 baseline.
OPTION_VARIANTS = {
    "fp32": {"dtype": "float32"},
    "fp32 channels_last": {"dtype": "float32", "channels_last": True},
    "bf16 autocast": {"dtype": "bfloat16"},
    "fp16 autocast": {"dtype": "float16"},
    "fp32 compile": {"dtype": "float32", "compile": True},
    "bf16 channels_last compile": {"dtype": "bfloat16", "channels_last": True, "compile": True},
}


def options(args) -> list[list]:
    rows, base = [], None
    batch = args.batches[-1]
    for name, opts in OPTION_VARIANTS.items():
        best = best_seconds(make(IWMFDiff, args, batch_size=batch, **opts), batch, args)
        base = base or best
        rows.append([name, batch, f"{best / batch:.4f}", f"{base / best:.2f}x"])
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def memory_worker(args) -> None:
    """One setting, in its own process; prints JSON."""
    d = make(DiffPure, args, batch_size=args.mem_batch, checkpoint_steps=bool(args.checkpoint))
    res = d.prior.resolution
    x = torch.rand(args.mem_batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(args.device)
    x.requires_grad_(True)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # What autograd keeps for the backward pass, counted once per storage: inside a
    # checkpointed step the checkpoint's own hooks take over, so only step inputs show.
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = d.purify(x, torch.Generator().manual_seed(1), grad_mode="exact").square().sum()
    loss.backward()
    sync(args.device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mib": (peak - base) / 2 ** 20, "saved_mib": sum(saved.values()) / 2 ** 20,
                      "seconds": elapsed}))


def memory(args) -> list[list]:
    rows = []
    for steps in args.mem_steps:
        row = [steps]
        for ckpt in (1, 0):
            cmd = [sys.executable, __file__, "--_memory-worker", "--config", args.config, "--device", args.device,
                   "--timesteps", str(steps), "--mem-batch", str(args.mem_batch), "--checkpoint", str(ckpt),
                   "--dtype", args.dtype or "auto"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                row += ["failed", "", ""]
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            row += [f"{res['saved_mib']:.1f}", f"{res['peak_mib']:.0f}", f"{res['seconds']:.2f}"]
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="diffusion prior: tiny, tiny_adm, celeba_hq, cifar10, "
                   "imagenet_256 or a YAML path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timesteps", type=int, default=20, help="DDRM steps for the speed table")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is reported)")
    p.add_argument("--mem-steps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--mem-batch", type=int, default=16, help="batch of the memory measurement")
    p.add_argument("--dtype", default=None, help="auto (fp32 CPU, bf16 autocast GPU), float32, bfloat16, float16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--options-table", action="store_true",
                   help="also time IWMF-Diff under each dtype/channels_last/compile variant "
                   "(largest --batches), as speed-ups over fp32 in the same run")
    p.add_argument("--_memory-worker", dest="memory_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return 0

    where = f"{args.device} ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") \
        else f"cpu, {torch.get_num_threads()} threads"
    prior = load_prior_config(args.config)
    with torch.device("meta"):  # counted without allocating
        params = sum(p.numel() for p in build_unet(prior.unet).parameters())
    print(f"config={args.config} ({type(prior.unet).__name__}, {prior.resolution}x{prior.resolution}, "
          f"{params:,} parameters)  device={where}  dtype={args.dtype or 'auto'}  torch {torch.__version__}")
    if not args.skip_speed:
        rows = speed(args)
        print("\nPurification speed (grad_mode=none, best of %d)" % args.repeats)
        print(tabulate(rows, headers=["defense", "batch", "steps", "s/batch", "s/image"], tablefmt="github"))
    if args.options_table:
        rows = options(args)
        print("\nSpeed options (IWMF-Diff, grad_mode=none, best of %d; speed-up over fp32)" % args.repeats)
        print(tabulate(rows, headers=["variant", "batch", "s/image", "speed-up"], tablefmt="github"))
    if not args.skip_memory:
        rows = memory(args)
        unit = "CUDA max allocated" if args.device.startswith("cuda") else "RSS high-water increase, noisy"
        print(f"\nExact-gradient memory, batch {args.mem_batch}: MiB saved by autograd for backward, "
              f"peak MiB ({unit}), forward+backward seconds")
        print(tabulate(rows, headers=["steps", "ckpt saved", "ckpt peak", "s", "no-ckpt saved", "no-ckpt peak", "s"],
                       tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
