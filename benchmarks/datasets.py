"""Streaming evaluation on a generated dataset: images/s and peak memory for loading +
embedding + scoring, at two dataset sizes, to show memory does not grow with the size.

    python benchmarks/datasets.py [--sizes 2000 10000] [--pairs-per-image 0.6] [--batch 64]

Generates (in a temporary folder, deleted afterwards) the largest size's random-pixel
150x150 JPEGs, 5 per identity, with a CelebA-style identity file; each size reads the
first N images through the ``identity-list`` dataset with 0.6 N pairs (half genuine,
half impostor: 10,000 images -> 6,000 pairs), and scores every pair with dlib-resnet
(no alignment: random pixels have no face). Each size runs in a fresh process, so its
peak resident memory (``ru_maxrss``) is its own; ``model RSS`` is the resident memory
once torch and the model are loaded, before any image is read. Random pixels are fine
for timing: the work per image does not depend on the content.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(root: str, identity_file: str, pairs: int, batch: int) -> dict:
    from iwmf_bench.calibration import score_pairs
    from iwmf_bench.datasets import open_dataset
    from iwmf_bench.models.dlib_resnet import DlibResNet

    model = DlibResNet().eval()
    with torch.no_grad():
        model.embed(torch.zeros(1, 3, 150, 150))  # warm-up outside the timing
    base = _rss_mb()
    start = time.perf_counter()
    ds = open_dataset("identity-list", root=root, identity_file=identity_file, pairs=pairs // 2, seed=0)
    used = len({p.a for p in ds.pairs()} | {p.b for p in ds.pairs()})
    s, same, _ = score_pairs(ds, model, ds.pairs(), align=False, batch=batch, progress=False)
    seconds = time.perf_counter() - start
    return {"images": len(ds), "images_read": used, "pairs": int(s.numel()), "seconds": seconds,
            "images_per_s": used / seconds, "model_rss_mb": base,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def generate(folder: Path, n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        pixels = torch.randint(0, 256, (150, 150, 3), generator=gen, dtype=torch.uint8).numpy()
        name = f"{i:06d}.jpg"
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / name, quality=90)
        lines.append(f"{name} {i // 5}")
    (folder / "identity_all.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--pairs-per-image", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "IDENTITY_FILE", "PAIRS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, ident, pairs = args.child
        print(json.dumps(child(root, ident, int(pairs), args.batch)))
        return
    from tabulate import tabulate

    rows = []
    with tempfile.TemporaryDirectory(prefix="iwmf-bench-datasets-") as tmp:
        folder = Path(tmp)
        print(f"generating {max(args.sizes)} random-pixel images in {folder} ...", file=sys.stderr)
        generate(folder, max(args.sizes))
        lines = (folder / "identity_all.txt").read_text().splitlines()
        for n in args.sizes:
            ident = folder / f"identity_{n}.txt"
            ident.write_text("\n".join(lines[:n]) + "\n")
            pairs = 2 * round(args.pairs_per_image * n / 2)
            out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--child", str(folder),
                                  str(ident), str(pairs)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append([r["images"], r["pairs"], r["images_read"], f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}",
                         f"{r['model_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                         f"{r['peak_rss_mb'] - r['model_rss_mb']:.0f}"])
    print(f"dlib-resnet, no alignment, batch {args.batch}, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(tabulate(rows, headers=["images", "pairs", "images read", "seconds", "images/s", "model RSS MB",
                                  "peak RSS MB", "peak - model MB"], tablefmt="github"))


if __name__ == "__main__":
    main()
