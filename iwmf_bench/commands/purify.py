"""``iwmf-bench purify``: purify a folder of images with a registered defense."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .. import registry
from ..data import load_folder, save_images
from ..errors import BenchError


def register(sub):
    p = sub.add_parser("purify", help="purify a folder of NNNNN_label.ext images")
    p.add_argument("--defense", required=True, help="registered defense name (see `iwmf-bench list`)")
    p.add_argument("--lambda-0", type=float, default=None, help="IWMF window density lambda_0")
    p.add_argument("--s", type=int, default=None, help="IWMF window size")
    p.add_argument("--sigma-y", type=float, default=None, help="DDRM noise level (diffusion defenses)")
    p.add_argument("--weights", default=None, help="local checkpoint file for defenses with weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=run)


def defense_kwargs(args) -> dict:
    """Options given on the command line, under the defenses' keyword names."""
    names = {"lambda_0": "lambda_0", "s": "s", "sigma_y": "sigma_y", "weights": "weights"}
    return {kw: getattr(args, attr) for attr, kw in names.items() if getattr(args, attr, None) is not None}


def run(args) -> int:
    try:
        defense = registry.create("defenses", args.defense, **defense_kwargs(args))
    except TypeError as exc:
        raise BenchError(f"defense {args.defense!r} does not take these options: {exc}") from None
    defense = defense.to(args.device)
    data = load_folder(args.input)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    outputs = []
    for i in tqdm(range(0, len(data), args.batch_size), desc=f"purify[{args.defense}]", unit="batch"):
        batch = data.images[i:i + args.batch_size].to(args.device)
        outputs.append(defense.purify(batch, generator=generator).cpu())
    elapsed = time.perf_counter() - start
    save_images(torch.cat(outputs), data.names, args.output)
    print(f"purified {len(data)} images with {args.defense} in {elapsed:.3f} s "
          f"({elapsed / len(data):.4f} s/image) -> {args.output}")
    return 0
