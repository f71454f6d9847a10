"""``iwmf-bench list``: what is registered, with one-line descriptions."""

from __future__ import annotations

from .. import registry


def register(sub):
    p = sub.add_parser("list", help="list registered models, defenses and attacks (built-ins and plugins)")
    p.set_defaults(func=run)


def run(args) -> int:
    for kind in registry.GROUPS:
        print(f"{kind}:")
        for entry in registry.available(kind).values():
            origin = "" if entry.distribution == "iwmf-bench" else f"  [plugin: {entry.distribution}]"
            print(f"  {entry.name:<14} {entry.description}{origin}")
    broken = registry.broken()
    if broken:
        print("broken plugins (skipped):")
        for b in broken:
            print(f"  {b.kind}/{b.name} from {b.distribution} ({b.source}): {b.error}")
    return 0
