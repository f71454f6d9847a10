"""``iwmf-bench purify``: purify a folder of images with a registered defense."""

from __future__ import annotations

import time

import torch
import yaml
from tqdm import tqdm

from .. import registry
from ..data import check_output_folder, load_folder, save_images
from ..errors import BenchError


def register(sub):
    p = sub.add_parser("purify", help="purify a folder of NNNNN_label.ext images")
    p.add_argument("--defense", required=True, help="registered defense name (see `iwmf-bench list`)")
    add_defense_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=run)


def add_defense_options(p) -> None:
    """The defense's options: the common ones by name, any other through --defense-option."""
    p.add_argument("--lambda-0", type=float, default=None, help="IWMF window density lambda_0")
    p.add_argument("--s", type=int, default=None, help="IWMF window size")
    p.add_argument("--sigma-y", type=float, default=None, help="DDRM noise level (diffusion defenses)")
    p.add_argument("--weights", default=None, help="local checkpoint file for defenses with weights")
    p.add_argument("--defense-option", "-D", action="append", default=[], metavar="KEY=VALUE",
                   help="any other keyword of the defense, VALUE read as YAML (repeatable), e.g. "
                   "-D timesteps=10 -D dtype=bf16 -D channels_last=true -D compile=true")


def parse_option(text: str, flag: str = "--defense-option", example: str = "timesteps=10") -> tuple[str, object]:
    """``KEY=VALUE`` from the command line: the key as a keyword name, the value read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise BenchError(f"{flag} expects KEY=VALUE (e.g. {example}), got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise BenchError(f"{flag} {text!r}: VALUE is not valid YAML ({exc})") from None


def defense_kwargs(args) -> dict:
    """Options given on the command line, under the defenses' keyword names."""
    names = {"lambda_0": "lambda_0", "s": "s", "sigma_y": "sigma_y", "weights": "weights"}
    kwargs = {kw: getattr(args, attr) for attr, kw in names.items() if getattr(args, attr, None) is not None}
    for text in getattr(args, "defense_option", []):
        key, value = parse_option(text)
        if key in kwargs:
            raise BenchError(f"defense option {key!r} is given twice")
        kwargs[key] = value
    return kwargs


def build_defense(args):
    """The defense named by ``--defense`` with the command line's options, on ``--device``,
    in eval mode; options it does not take are an error that lists the ones it does."""
    entry = registry.get("defenses", args.defense)
    kwargs = defense_kwargs(args)
    unknown, params = registry.unknown_options(entry.factory, kwargs)
    if unknown:
        raise BenchError(f"defense {args.defense!r} does not take {', '.join(map(repr, unknown))} "
                         f"(it takes: {', '.join(params)})")
    try:
        defense = entry.factory(**kwargs)
    except TypeError as exc:
        raise BenchError(f"defense {args.defense!r} does not take these options: {exc}") from None
    return defense.to(args.device).eval()


def run(args) -> int:
    check_output_folder(args.output, args.input)
    defense = build_defense(args)
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
