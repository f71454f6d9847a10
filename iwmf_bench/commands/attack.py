"""``iwmf-bench attack``: impersonation (or dodging) attacks on a folder of face pairs.

Source ``i`` impersonates target ``i`` (files matched by their id ``NNNNN``). The
adversarial images are written as 8-bit PNGs under the sources' names, then read back
and scored: the FAR before (clean sources) and after (the saved images), through the
defense when one is given (single-shot and worst-of-N on fresh randomness, see
:func:`iwmf_bench.scoring.evaluate`). Without ``--adaptive`` the attack is
crafted on the undefended model and the defense is applied only at evaluation (the
paper's transfer setting); with ``--adaptive`` the defense is in the attack's loop.
"""

from __future__ import annotations

import json
import time

import torch

from .. import registry
from ..scoring import evaluate
from ..attacks.base import AttackTask
from ..data import check_output_folder, load_folder, read_image, save_images
from ..errors import BenchError
from ..models.base import frozen
from .purify import add_defense_options, build_defense, defense_kwargs, parse_option


def register(sub):
    p = sub.add_parser("attack", help="attack face pairs (source i impersonates target i) and report FAR")
    p.add_argument("--attack", required=True, help="registered attack name (see `iwmf-bench list`)")
    p.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    p.add_argument("--eps", type=float, default=None, help="perturbation budget (default: 0.03 Linf, 0.5 L2)")
    p.add_argument("--steps", type=int, default=None, help="iterations (gradient attacks)")
    p.add_argument("--queries", type=int, default=None, help="query budget per image (black-box attacks)")
    p.add_argument("--attack-option", "-A", action="append", default=[], metavar="KEY=VALUE",
                   help="any other keyword of the attack, VALUE read as YAML (repeatable), e.g. "
                   "--attack torchattacks -A name=MIFGSM -A decay=1.0")
    p.add_argument("--goal", choices=["impersonation", "dodging"], default="impersonation",
                   help="dodging: the targets are the sources' own identities, to be rejected")
    p.add_argument("--model", required=True, help="registered face model (see `iwmf-bench list`)")
    p.add_argument("--sources", required=True, help="folder of NNNNN_label images to perturb")
    p.add_argument("--targets", required=True, help="folder of NNNNN_label reference images (same ids)")
    p.add_argument("--output", required=True, help="folder for the adversarial PNGs")
    p.add_argument("--defense", default=None, help="registered defense applied at evaluation (and in the "
                   "attack's loop with --adaptive)")
    add_defense_options(p)
    p.add_argument("--adaptive", action="store_true", help="put the defense in the attack's loop")
    p.add_argument("--grad-mode", choices=["exact", "bpda"], default=None,
                   help="with --adaptive: how gradients pass through the defense (default: its best)")
    p.add_argument("--eot", type=int, default=None,
                   help="with --adaptive: draws of the defense's randomness per step or query "
                   "(default 20 for gradient attacks, the attack's own default otherwise)")
    p.add_argument("--n-draws", type=int, default=10, help="purifications per image at evaluation (worst-of-N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def attack_kwargs(args, factory) -> dict:
    """Options given on the command line, checked against what the attack accepts."""
    given = {"norm": args.norm, "goal": args.goal}
    for option, kw in (("eps", "eps"), ("steps", "steps"), ("queries", "queries"), ("eot", "eot_iter"),
                       ("grad_mode", "grad_mode")):
        if getattr(args, option) is not None:
            given[kw] = getattr(args, option)
    for text in args.attack_option:
        key, value = parse_option(text, "--attack-option", "name=MIFGSM")
        if key in given:
            raise BenchError(f"attack option {key!r} is given twice (as a flag and with -A, or twice with -A)")
        given[key] = value
    params = registry.accepted_options(factory)
    if params is None:  # takes **kwargs or cannot be introspected: let the call decide
        return given
    if args.adaptive and "eot_iter" not in given and "eot_iter" in params \
            and getattr(factory, "uses_gradients", False):
        given["eot_iter"] = 20  # gradient attacks through a purifier: EOT by default
    for kw in given:
        if kw not in params:
            option = {"eot_iter": "--eot"}.get(kw, "--" + kw.replace("_", "-"))
            option = f"-A {kw}" if any(parse_option(t)[0] == kw for t in args.attack_option) else option
            raise BenchError(f"attack {args.attack!r} does not take {option} "
                             f"(it takes: {', '.join(params)})")
    return given


def _check_options(args) -> None:
    if args.adaptive and not args.defense:
        raise BenchError("--adaptive needs a --defense to adapt to")
    if not args.adaptive:
        for option, value in (("--grad-mode", args.grad_mode), ("--eot", args.eot)):
            if value is not None:
                raise BenchError(f"{option} only applies with --adaptive (the defense in the attack's loop)")
    if not args.defense and (options := defense_kwargs(args)):
        raise BenchError(f"defense options ({', '.join(options)}) need a --defense to apply to")
    if args.n_draws < 1:
        raise BenchError(f"--n-draws must be >= 1, got {args.n_draws}")


def run(args) -> int:
    _check_options(args)
    check_output_folder(args.output, args.sources, args.targets)
    entry = registry.get("attacks", args.attack)
    kwargs = attack_kwargs(args, entry.factory)
    try:
        attack = entry.factory(**kwargs)
    except TypeError as exc:
        raise BenchError(f"attack {args.attack!r} does not take these options: {exc}") from None
    attack.progress = True  # a bar on stderr: stdout stays clean for --json
    sources, targets = load_folder(args.sources), load_folder(args.targets)
    if sources.ids != targets.ids:
        only_s = sorted(set(sources.ids) - set(targets.ids))[:5]
        only_t = sorted(set(targets.ids) - set(sources.ids))[:5]
        raise BenchError(f"source and target ids do not match ({len(sources)} sources, {len(targets)} targets; "
                         f"only in sources: {[f'{i:05d}' for i in only_s]}, "
                         f"only in targets: {[f'{i:05d}' for i in only_t]})")

    model = frozen(registry.create("models", args.model), args.device)
    defense = build_defense(args) if args.defense else None
    x = sources.images.to(args.device)
    with torch.no_grad():
        references = model.embed(targets.images.to(args.device))

    def score(images):
        return evaluate(model, defense, images, references, args.seed, args.n_draws, args.goal)

    before = score(x)
    task = AttackTask(model, x, references, defense if args.adaptive else None, args.seed)
    start = time.perf_counter()
    result = attack.run(task)
    elapsed = time.perf_counter() - start
    paths = save_images(result.adversarial, sources.names, args.output)
    saved = torch.stack([read_image(p) for p in paths]).to(args.device)
    after = score(saved)
    delta = (saved - x).flatten(1)
    perturbation = float(delta.abs().amax() if attack.norm == "Linf" else delta.norm(dim=1).max())

    setting = "undefended" if defense is None else ("adaptive" if args.adaptive else "transfer")
    rate = "FAR" if args.goal == "impersonation" else "dodging success"
    report = {
        "attack": attack.config(), "model": args.model,
        "defense": None if defense is None else {"name": args.defense, **defense.config()},
        "setting": setting, "pairs": len(sources), "seed": args.seed, "goal": args.goal,
        "before": before.to_dict(), "after": after.to_dict(),
        "success_during_attack": result.success_rate.to_dict(),
        "queries_per_image": float(result.queries.float().mean()),
        "max_perturbation": perturbation, "flags": result.flags, "seconds": elapsed,
        "output": str(args.output),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    where = "" if defense is None else f" through {args.defense} {defense.config()} ({setting})"
    print(f"{attack!r} on {args.model}{where}: {len(sources)} pairs, seed {args.seed}, {elapsed:.1f} s")
    for label, ev in (("before (clean sources)", before), ("after (saved adversarial images)", after)):
        if ev.n_draws > 1:
            print(f"{rate} {label}: single-shot {ev.single_shot}, worst-of-{ev.n_draws} {ev.worst_of_n}")
        else:
            print(f"{rate} {label}: {ev.worst_of_n}")
    print(f"success during the attack: {result.success_rate}; queries/image "
          f"{report['queries_per_image']:.0f}; max {attack.norm} perturbation of the saved images "
          f"{perturbation:.4g} (eps {attack.eps:g})")
    raised = result.raised_flags()
    print(f"sanity flags: {', '.join(raised) if raised else 'none'}")
    print(f"wrote {len(paths)} images to {args.output}")
    return 0
