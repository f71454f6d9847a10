"""``iwmf-bench align``: 5-landmark alignment of raw face photos to a model's crop."""

from __future__ import annotations

from ..align import SPECS, align_folder


def register(sub):
    p = sub.add_parser("align", help="align raw face photos to a model's template (MTCNN landmarks)")
    p.add_argument("--model", required=True, help="the model whose crop to make: " + ", ".join(
        f"{name} ({spec.size})" for name, spec in SPECS.items()))
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    failed = align_folder(args.input, args.output, args.model, device=args.device)
    return 1 if failed else 0
