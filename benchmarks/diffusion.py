"""Speed and exact-gradient memory of the diffusion defenses (random UNet weights).

    .venv/bin/python benchmarks/diffusion.py                       # tiny UNet, CPU
    .venv/bin/python benchmarks/diffusion.py --config celeba_hq --device cuda
    .venv/bin/python benchmarks/diffusion.py --config imagenet_256 --batches 1 --timesteps 2 --skip-memory
    .venv/bin/python benchmarks/diffusion.py --variants "fp32 eager" default --skip-memory

``--config`` is any prior in iwmf_bench/priors/ (tiny, tiny_adm, celeba_hq, cifar10,
imagenet_256) or a path to a prior YAML.

Table 1: seconds per image of DiffPure and IWMF-Diff (``grad_mode="none"``) for each
batch size, with the device's default options (printed first: on CUDA bf16 autocast,
SDPA, torch.compile and CUDA graphs; on CPU fp32 eager).

Table 2 (skip with ``--skip-options``): IWMF-Diff under fp32 eager, the default and each
option alone and combined (bf16 autocast, SDPA against its math backend, autocast's own
float32 GroupNorm against ours, channels_last, torch.compile, CUDA graphs), for each batch
size, as speed-ups over fp32 eager in the same run. An option that falls back (compile
failing, CUDA graphs off the GPU) says so in the ``ran as`` column.

Table 3: memory and time of one ``grad_mode="exact"`` forward + backward against the
number of DDRM steps, under each memory policy: ``checkpoint`` (every step recomputed),
``keep`` (every step's activations kept) and ``auto`` (the default; the policy it chose is
shown). Each setting runs in a fresh subprocess and reports (a) the bytes autograd saves
for backward (exact and deterministic, counted with saved-tensor hooks) and (b) the peak:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the resident-set high-water mark
(``getrusage``) minus its value once the model and inputs exist, which allocator reuse
makes noisy.

Table 4 (skip with ``--skip-eot``): one step of an exact-gradient EOT attack through
IWMF-Diff (``purify_draws`` of ``--eot-images`` images x ``--eot-draws`` draws, forward and
backward, ``--eot-steps`` DDRM steps), with the draws in one DDRM run
(``draws_in_one_run``, the CUDA default) against one run per draw, side by side, and the
largest difference between the two results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import torch
from tabulate import tabulate

from iwmf_bench.defenses import diffusion_unet
from iwmf_bench.defenses.diffusion import DiffPure, IWMFDiff
from iwmf_bench.defenses.diffusion_prior import build_unet, load_prior_config


def make(cls, args, **kw):
    d = cls(config=args.config, pretrained=False, timesteps=args.timesteps, **kw)
    d = d.to(args.device)
    d.load_model()
    return d


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_seconds(d, batch: int, args) -> float:
    """Best of ``args.repeats`` timed purifications of one batch, after a warm-up (which
    also compiles and captures CUDA graphs)."""
    res = d.prior.resolution
    x = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(args.device)
    d.purify(x, torch.Generator().manual_seed(1))  # warm-up (allocations, compile, autotuning, graphs)
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
            best = best_seconds(make(cls, args, batch_size=batch, dtype=args.dtype), batch, args)
            rows.append([cls.registered_name, batch, args.timesteps, f"{best:.3f}", f"{best / batch:.4f}"])
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def sdpa_math():
    """SDPA restricted to its math backend: an explicit matmul + softmax, what CUDA ran
    before the attention inputs were made contiguous in their last dimension."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def autocast_group_norm():
    """GroupNorm as plain autocast runs it (float32 on CUDA; the low dtype on CPU)."""
    ours = diffusion_unet.GroupNorm.forward
    diffusion_unet.GroupNorm.forward = torch.nn.GroupNorm.forward
    try:
        yield
    finally:
        diffusion_unet.GroupNorm.forward = ours


# The variants side by side, each against the same run's fp32 eager: (options, context).
EAGER = {"compile": False, "cuda_graphs": False}
BF16 = {"dtype": "bfloat16"}
VARIANTS = {
    "fp32 eager": ({"dtype": "float32", **EAGER}, None),
    "default": ({}, None),
    "fp32 eager, SDPA math backend": ({"dtype": "float32", **EAGER}, sdpa_math),
    "bf16 eager": ({**BF16, **EAGER}, None),
    "bf16 eager, SDPA math backend": ({**BF16, **EAGER}, sdpa_math),
    "bf16 eager, autocast's GroupNorm": ({**BF16, **EAGER}, autocast_group_norm),
    "fp16 eager": ({"dtype": "float16", **EAGER}, None),
    "fp32 channels_last": ({"dtype": "float32", "channels_last": True, **EAGER}, None),
    "bf16 channels_last": ({**BF16, "channels_last": True, **EAGER}, None),
    "fp32 compile": ({"dtype": "float32", "compile": True, "cuda_graphs": False}, None),
    "bf16 compile": ({**BF16, "compile": True, "cuda_graphs": False}, None),
    "bf16 channels_last compile": ({**BF16, "channels_last": True, "compile": True, "cuda_graphs": False}, None),
    "fp32 cuda graphs": ({"dtype": "float32", "compile": False, "cuda_graphs": True}, None),
    "bf16 cuda graphs": ({**BF16, "compile": False, "cuda_graphs": True}, None),
    "bf16 compile cuda graphs": ({**BF16, "compile": True, "cuda_graphs": True}, None),
    "bf16 channels_last compile cuda graphs": ({**BF16, "channels_last": True, "compile": True,
                                                "cuda_graphs": True}, None),
}


def ran_as(d, device: str) -> str:
    """What a variant actually ran: the resolved options, and any fallback."""
    opts = d.speed_options(device)
    parts = [opts["dtype"]]
    if opts["channels_last"]:
        parts.append("channels_last")
    if opts["compile"]:
        parts.append("compile (fell back: eager)" if getattr(d._eps_fn, "failed", False) else "compile")
    if d.cuda_graphs and not device.startswith("cuda"):
        parts.append("cuda graphs (fell back: no CUDA)")
    elif opts["cuda_graphs"] or d._graphs_failed:
        parts.append("cuda graphs (fell back: eager)" if d._graphs_failed else "cuda graphs")
    return ", ".join(parts)


def options(args) -> list[list]:
    rows = []
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "fp32 eager" not in names:
        names = ["fp32 eager", *names]
    for batch in args.batches:
        base = None
        for name in names:
            opts, context = VARIANTS[name]
            with context() if context else contextlib.nullcontext():
                try:
                    d = make(IWMFDiff, args, batch_size=batch, **opts)
                    best = best_seconds(d, batch, args)
                except Exception as exc:  # noqa: BLE001 - one failing variant does not end the table
                    rows.append([name, batch, "failed", "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"])
                    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
                    continue
            base = base or best
            rows.append([name, batch, f"{best / batch:.4f}", f"{base / best:.2f}x", ran_as(d, args.device)])
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


POLICIES = {"checkpoint": "true", "keep": "false", "auto": "auto"}  # label -> checkpoint_steps


def memory_worker(args) -> None:
    """One setting, in its own process; prints JSON."""
    d = make(DiffPure, args, batch_size=args.mem_batch, checkpoint_steps=args.checkpoint,
             dtype=args.dtype, channels_last=args.channels_last, compile=args.compile)
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
                      "seconds": elapsed, "policy": d.last_memory_policy, "info": d.last_memory_info}))


def memory(args) -> list[list]:
    rows = []
    for steps in args.mem_steps:
        row = [steps]
        for label, setting in POLICIES.items():
            cmd = [sys.executable, __file__, "--_memory-worker", "--config", args.config, "--device", args.device,
                   "--timesteps", str(steps), "--mem-batch", str(args.mem_batch), "--checkpoint", setting,
                   "--dtype", args.dtype or "auto", "--compile", args.compile or "auto"]
            if args.channels_last:
                cmd.append("--channels-last")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                row += ["failed", "", ""] + (["", ""] if label == "auto" else [])
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            row += [f"{res['saved_mib']:.1f}", f"{res['peak_mib']:.0f}", f"{res['seconds']:.2f}"]
            if label == "auto":
                info = res["info"]
                kept = f" ({info['kept_steps']}/{info['steps']} kept)" if res["policy"] == "mixed" else ""
                row += [f"{res['policy']}{kept}",
                        f"{info['step_bytes'] / 2 ** 20:.0f}" if info.get("step_bytes") else "-"]
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def eot(args) -> list[list]:
    """Seconds of one EOT step, draws in one run against the loop (same randomness)."""
    res = load_prior_config(args.config).resolution
    x = torch.rand(args.eot_images, 3, res, res, generator=torch.Generator().manual_seed(0)).to(args.device)
    xs = x.repeat(args.eot_draws, 1, 1, 1)
    rows, outs = [], {}
    for one_run in (False, True):
        d = make(IWMFDiff, argparse.Namespace(**{**vars(args), "timesteps": args.eot_steps}), dtype=args.dtype,
                 compile=args.compile, batch_size=args.eot_images * args.eot_draws, draws_in_one_run=one_run)
        times = []
        for r in range(args.repeats + 1):  # the first is the warm-up
            images = xs.clone().requires_grad_(True)
            sync(args.device)
            start = time.perf_counter()
            out = d.purify_draws(images, torch.Generator().manual_seed(5), args.eot_draws, "exact")
            grad, = torch.autograd.grad(out.sum(), images)
            sync(args.device)
            times.append(time.perf_counter() - start)
        outs[one_run] = out.detach()
        rows.append(["one run" if one_run else "a run per draw", args.eot_images, args.eot_draws, args.eot_steps,
                     f"{min(times[1:]):.3f}", d.last_memory_policy])
    base = float(rows[0][4])
    for row in rows:
        row.append(f"{base / float(row[4]):.2f}x")
    rows[1].append(f"{(outs[True] - outs[False]).abs().max().item():.1e}")
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
    p.add_argument("--dtype", default=None, help="speed and memory tables: auto (the device's default), "
                   "float32, bfloat16, float16")
    p.add_argument("--channels-last", action="store_true", help="memory table only")
    p.add_argument("--compile", default=None, help="memory and EOT tables only: auto, true or false")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-options", action="store_true", help="no table of speed options")
    p.add_argument("--options-table", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"speed-option variants to time (default all): {', '.join(VARIANTS)}")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-eot", action="store_true")
    p.add_argument("--eot-images", type=int, default=4, help="EOT table: images per draw")
    p.add_argument("--eot-draws", type=int, default=4, help="EOT table: draws per step")
    p.add_argument("--eot-steps", type=int, default=4, help="EOT table: DDRM steps")
    p.add_argument("--_memory-worker", dest="memory_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = None
    if args.compile == "auto":
        args.compile = None
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
    defaults = IWMFDiff(config=args.config, pretrained=False, dtype=args.dtype).speed_options(args.device)
    print(f"config={args.config} ({type(prior.unet).__name__}, {prior.resolution}x{prior.resolution}, "
          f"{params:,} parameters)  device={where}  torch {torch.__version__}")
    print("default options here: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    if not args.skip_speed:
        rows = speed(args)
        print("\nPurification speed (grad_mode=none, %s, best of %d)" % (args.dtype or "default options", args.repeats))
        print(tabulate(rows, headers=["defense", "batch", "steps", "s/batch", "s/image"], tablefmt="github"))
    if not args.skip_options:
        rows = options(args)
        print("\nSpeed options (IWMF-Diff, grad_mode=none, %d steps, best of %d; speed-up over fp32 eager)"
              % (args.timesteps, args.repeats))
        print(tabulate(rows, headers=["variant", "batch", "s/image", "speed-up", "ran as"], tablefmt="github"))
    if not args.skip_memory:
        rows = memory(args)
        unit = "CUDA max allocated" if args.device.startswith("cuda") else "RSS high-water increase, noisy"
        print(f"\nExact-gradient memory, DiffPure, batch {args.mem_batch}, {args.dtype or 'default options'}: "
              f"MiB saved by autograd for backward, peak MiB ({unit}), forward+backward seconds, per policy; "
              "auto: the policy it chose and one step's measured MiB")
        print(tabulate(rows, headers=["steps", "ckpt saved", "ckpt peak", "s", "keep saved", "keep peak", "s",
                                      "auto saved", "auto peak", "s", "auto chose", "step MiB"],
                       tablefmt="github"))
    if not args.skip_eot:
        rows = eot(args)
        print(f"\nOne exact-gradient EOT step through IWMF-Diff (forward + backward, {args.dtype or 'default options'}, "
              f"best of {args.repeats}): draws in one DDRM run against a run per draw")
        print(tabulate(rows, headers=["EOT draws run as", "images", "draws", "steps", "s/step", "memory policy", "speed-up",
                                      "max |difference|"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
