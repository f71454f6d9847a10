"""Figures for the leaderboards and the docs: FAR per threat model per defense, example images, and the
clean ROC of each defense (dataset suites)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import roc
from .data import to_uint8
from .equal_utility import split_recrafted, undefended_rows, worst_at_equal_utility
from .leaderboard import budget_order, first_per_defense, success, worst_case
from .ranking import comparability
from .pipeline.outcome import metrics_of
from .suite import Suite


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (110 dpi) and close a matplotlib figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def far_plot(suite: Suite, records: list[dict], path: str | Path) -> Path | None:
    """Grouped bars: FAR (single-shot, with 95% intervals) per threat model and defense,
    one panel per model, the worst case over the threat models of each budget first (the
    leaderboard's ranking columns, :func:`~iwmf_bench.leaderboard.worst_case`). Returns
    None when no cell finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in split_recrafted(records)[0] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["cell"]["model"] for r in ok))
    if not models:
        return None
    threats = [t for t in suite.columns() if suite.shown(t) and any(r["cell"]["threat"] == t for r in ok)]
    defenses = [d for d in suite.defenses if any(r["cell"]["defense"] == d for r in ok)]
    fig, axes = plt.subplots(len(models), 1, figsize=(1.6 + 1.3 * (len(threats) + 1), 3.2 * len(models)),
                             squeeze=False)
    width = 0.8 / max(1, len(defenses))
    for ax, model in zip(axes[:, 0], models):
        worst = {d: worst_case([r for r in ok if r["cell"]["model"] == model and r["cell"]["defense"] == d])
                 for d in defenses}
        budgets = sorted({b for w in worst.values() for b in w}, key=budget_order)
        columns = [f"worst case {b}" for b in budgets] + threats
        for j, d in enumerate(defenses):
            xs, ys, lo, hi = [], [], [], []
            for i, column in enumerate(columns):
                if i < len(budgets):
                    if budgets[i] not in worst[d]:
                        continue
                    value, (low, high) = worst[d][budgets[i]]["value"], worst[d][budgets[i]]["ci95"]
                else:
                    r = next((r for r in ok if r["cell"]["model"] == model and r["cell"]["defense"] == d
                              and r["cell"]["threat"] == column), None)
                    if r is None:
                        continue
                    value, (low, high) = success(r).value, success(r).interval
                xs.append(i + (j - (len(defenses) - 1) / 2) * width)
                ys.append(100 * value)
                lo.append(max(0.0, 100 * (value - low)))
                hi.append(max(0.0, 100 * (high - value)))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=d)
        if budgets:
            ax.axvline(len(budgets) - 0.5, color="grey", lw=0.6, ls=":")
        ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("FAR %")
        ax.set_ylim(0, 105)
        ax.set_title(f"{model} ({suite.name} suite)", fontsize=10)
        ax.legend(fontsize=7, ncols=min(4, len(defenses)))
    return save_figure(fig, path)


def example_grid(columns: dict[str, torch.Tensor], path: str | Path, rows: int = 4, pad: int = 4) -> Path:
    """A grid image: one column per entry of ``columns`` (NCHW in [0,1], same size), one
    row per sample, with the column names written above."""
    from PIL import Image, ImageDraw

    names = list(columns)
    arrays = [to_uint8(columns[n][:rows]).numpy() for n in names]
    n, h, w = arrays[0].shape[0], arrays[0].shape[1], arrays[0].shape[2]
    header = 16
    canvas = Image.new("RGB", (len(names) * (w + pad) + pad, header + n * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (name, arr) in enumerate(zip(names, arrays)):
        x = pad + j * (w + pad)
        draw.text((x, 2), name, fill="black")
        for i in range(n):
            canvas.paste(Image.fromarray(arr[i]), (x, header + pad + i * (h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def roc_plots(suite, records: list[dict], imgs) -> list:
    """``imgs/<suite>_roc_<model>.png``: clean ROC of every defense of one model on one
    figure (dataset suites only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(dict.fromkeys(r["cell"]["model"] for r in records))
    for model in models:
        per = first_per_defense([r for r in records if r["cell"]["model"] == model], "clean")
        if not per:
            continue
        fig, ax = plt.subplots(figsize=(4.8, 4))
        for defense, m in per.items():
            far, tar, _ = roc.roc_curve(torch.tensor(m.clean["genuine_scores"]),
                                        torch.tensor(m.clean["impostor_scores"]), m.metric)
            far = torch.cat([torch.zeros(1, dtype=far.dtype), far])
            tar = torch.cat([torch.zeros(1, dtype=tar.dtype), tar])
            ax.step(far.numpy(), tar.numpy(), where="post", label=f"{defense} (AUC {m.clean['auc']:.3f})")
        ax.set_xlabel("FAR (clean impostor pairs)")
        ax.set_ylabel("TAR (clean genuine pairs)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model}: clean ROC per defense ({suite.name} suite)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        paths.append(save_figure(fig, Path(imgs) / f"{suite.name}_roc_{model}.png"))
    return paths


def sweep_points(suite: Suite, ok: dict, model: str, budgets) -> dict[str, list]:
    """Per defense with a finished cell, (x, the cell's success Rate) at each (x, cell label)
    of a sweep (``budgets``: eps or queries), from ``ok``: finished records by (model,
    defense, threat)."""
    curves = {d: [(x, success(ok[(model, d, label)])) for x, label in budgets if (model, d, label) in ok]
              for d in suite.defenses}
    return {d: points for d, points in curves.items() if points}


def lines_with_bands(ax, curves: dict) -> None:
    """One line per defense through its (x, Rate) points, the rate in %, with its 95%
    interval as a shaded band (security curves over eps or over queries)."""
    for d, points in curves.items():
        x = [k for k, _ in points]
        ax.plot(x, [100 * r.value for _, r in points], marker="o", ms=3, label=d)
        ax.fill_between(x, [100 * r.interval[0] for _, r in points], [100 * r.interval[1] for _, r in points],
                        alpha=0.12)


def security_curves(suite: Suite, records: list[dict], imgs: str | Path) -> dict[str, list[Path]]:
    """``imgs/<suite>_curve_<model>_<threat>.png`` for every budget sweep (``eps: [...]``):
    the attack's success (FAR, single-shot) against eps, one curve per defense with its
    95% interval as a band (Carlini et al. 2019 ask for exactly this). Per model, the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {(r["cell"]["model"], r["cell"]["defense"], r["cell"]["threat"]): r for r in records if r["status"] == "ok"}
    out: dict[str, list[Path]] = {}
    for model in dict.fromkeys(k[0] for k in ok):
        for threat, budgets in suite.sweeps().items():
            curves = sweep_points(suite, ok, model, budgets)
            if not curves:
                continue
            fig, ax = plt.subplots(figsize=(5.2, 3.8))
            lines_with_bands(ax, curves)
            opts = suite.threat_models[threat]
            ax.set_xlabel(f"budget eps ({opts.get('norm', 'Linf')})")
            ax.set_ylabel("dodging %" if opts.get("goal") == "dodging" else "FAR %")
            ax.set_ylim(-2, 102)
            ax.set_title(f"{model}: {threat} ({suite.name} suite)", fontsize=9)
            ax.legend(fontsize=6, ncols=2)
            out.setdefault(model, []).append(save_figure(fig, Path(imgs) / f"{suite.name}_curve_{model}_{threat}.png"))
        for threat, opts in suite.threat_models.items():
            if opts.get("attack") == "min-eps":
                path = minimal_budget_curve(suite, model, threat, ok, imgs)
                if path is not None:
                    out.setdefault(model, []).append(path)
    return out


def query_points(suite: Suite, records: list[dict]) -> dict[tuple[str, str], dict[str, list[tuple[int, object]]]]:
    """Per (model, query sweep of :meth:`~iwmf_bench.suite.Suite.query_sweeps`), per
    defense: (max_queries, the cell's success Rate) at each query budget it finished."""
    ok = {(r["cell"]["model"], r["cell"]["defense"], r["cell"]["threat"]): r for r in records if r["status"] == "ok"}
    sweeps = suite.query_sweeps()
    out: dict[tuple[str, str], dict[str, list]] = {}
    for model in dict.fromkeys(k[0] for k in ok):
        for name, budgets in sweeps.items():
            curves = sweep_points(suite, ok, model, budgets)
            if curves:
                out[(model, name)] = curves
    return out


def query_curves(suite: Suite, records: list[dict], imgs: str | Path) -> dict[str, list[Path]]:
    """``imgs/<suite>_queries_<model>_<sweep>.png`` for every query sweep: a decision-based
    attack's success (FAR, single-shot) against its query budget per pair (log scale), one
    curve per defense with its 95% interval as a band: the security curve of an attacker who
    sees accept/reject only. Per model, the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, list[Path]] = {}
    for (model, name), curves in query_points(suite, records).items():
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        lines_with_bands(ax, curves)
        ax.set_xscale("log")
        ax.set_xlabel("queries per pair (accept/reject answers)")
        ax.set_ylabel("FAR %")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{model}: {name} ({suite.name} suite)", fontsize=9)
        ax.legend(fontsize=6, ncols=2)
        out.setdefault(model, []).append(save_figure(fig, Path(imgs) / f"{suite.name}_queries_{model}_{name}.png"))
    return out


def minimal_budget_curve(suite: Suite, model: str, threat: str, ok: dict, imgs: str | Path) -> Path | None:
    """The empirical security curve of a minimal-budget threat: per defense, the fraction
    of pairs whose smallest breaking budget is at most eps (a step function)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = {d: metrics_of(ok[(model, d, threat)]).min_eps for d in suite.defenses if (model, d, threat) in ok}
    if not per:
        return None
    opts = suite.threat_models[threat]
    eps_max = float(opts.get("eps", 0.03))
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for d, b in per.items():
        values = sorted(v for v in b["values"] if v is not None)
        n = len(b["values"])
        xs = [0.0] + values + [eps_max]
        ys = [0.0] + [100 * (i + 1) / n for i in range(len(values))] + [100 * len(values) / n]
        ax.step(xs, ys, where="post", label=d)
    ax.set_xlabel(f"budget eps ({opts.get('norm', 'Linf')})")
    ax.set_ylabel("pairs broken at budget <= eps, %")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{model}: {threat}, minimal budgets ({suite.name} suite)", fontsize=9)
    ax.legend(fontsize=6, ncols=2)
    return save_figure(fig, Path(imgs) / f"{suite.name}_mineps_{model}_{threat}.png")


def tradeoff_curves(suite: Suite, records: list[dict], imgs: str | Path) -> dict[str, list[Path]]:
    """``imgs/<suite>_tradeoff_<model>_<budget>.png`` for a suite with strength sweeps
    (``suite.families``): genuine FRR at the model's threshold (x) against the worst-case
    FAR of the budget (y), one curve per family in the order of its parameter, the
    undefended point starred; left at the model's own threshold, right with the threshold
    re-tuned per setting to equal utility (:mod:`iwmf_bench.equal_utility`). Rows that met
    fewer threat models than others at a budget are left out of its figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, list[Path]] = {}
    if not suite.families:
        return out
    everything, (records, _) = records, split_recrafted(records)
    ok = [r for r in records if r["status"] == "ok"]
    for model in dict.fromkeys(r["cell"]["model"] for r in ok):
        mine = [r for r in ok if r["cell"]["model"] == model]
        by_def = {d: [r for r in records if r["cell"]["model"] == model and r["cell"]["defense"] == d]
                  for d in suite.defenses}
        frr = {d: metrics_of(rs[0]).frr_genuine.value for d in suite.defenses
               if (rs := [r for r in mine if r["cell"]["defense"] == d])}
        worst = {d: worst_case(rs) for d, rs in by_def.items() if d in frr}
        try:
            eu = worst_at_equal_utility(suite, [r for r in everything if r["cell"]["model"] == model])[1]
        except ValueError:
            eu = {}
        undefended = [d for d in undefended_rows(suite) if d in frr]
        for budget in sorted({b for w in worst.values() for b in w}, key=budget_order):
            apart = comparability({d: rs for d, rs in by_def.items() if worst.get(d)}, budget)
            fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
            for ax, per, title in ((axes[0], worst, "at the model's threshold"),
                                   (axes[1], eu, "at equal utility (threshold re-tuned)")):
                for family, f in suite.families.items():
                    pts = [(frr[d], per[d][budget], value) for d, value in f["rows"].items()
                           if d in frr and budget in per.get(d, {}) and not apart.get(d)]
                    if not pts:
                        continue
                    xs, ys = [100 * x for x, _, _ in pts], [100 * w["value"] for _, w, _ in pts]
                    err = [[max(0.0, y - 100 * w["ci95"][0]) for y, (_, w, _) in zip(ys, pts)],
                           [max(0.0, 100 * w["ci95"][1] - y) for y, (_, w, _) in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, lw=1.2, elinewidth=0.5,
                                label=f"{family} ({f['parameter']})")
                    for x, y, (_, _, value) in zip(xs, ys, pts):
                        ax.annotate(f"{value:g}" if isinstance(value, (int, float)) else str(value), (x, y),
                                    fontsize=6, xytext=(3, 3), textcoords="offset points")
                for d in undefended:
                    if budget in per.get(d, {}):
                        ax.plot([100 * frr[d]], [100 * per[d][budget]["value"]], marker="*", ms=12, color="black",
                                ls="none", label=d)
                ax.set_xlabel("genuine FRR % at the model's threshold (cost of the defense)")
                ax.set_title(title, fontsize=9)
                ax.set_ylim(-2, 102)
                ax.grid(alpha=0.3)
            axes[0].set_ylabel(f"worst-case FAR % ({budget})")
            axes[1].legend(fontsize=7, loc="best")
            fig.suptitle(f"{model}: security against genuine acceptance ({suite.name} suite)", fontsize=10)
            slug = budget.replace(" ", "")
            out.setdefault(model, []).append(save_figure(fig, Path(imgs) / f"{suite.name}_tradeoff_{model}_{slug}.png"))
    return out
