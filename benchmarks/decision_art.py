"""Our HopSkipJump beside ART's, on the same pairs, start points, norms and query budgets.

    python benchmarks/decision_art.py [--pairs 5] [--queries 5000 | --art-max-iter K]
                                      [--norms L2 Linf] [--defenses none iwmf] [--lambda-0 0.25]
                                      [--repeats 3] [--draws 20] [--seed 0]

Protocol (the same for both attacks). Pairs 0..N-1 (``--pairs``) of the shared images,
aligned for dlib-resnet as the suites align them (``folder_pairs``); source ``i``
impersonates target ``i`` at the model's own threshold (Euclidean distance <= 0.6). Both
attacks see only accept/reject: ours through :class:`~iwmf_bench.attacks.decision.DecisionOracle`,
ART's (``art.attacks.evasion.HopSkipJump``, targeted to class 1 = "accept") through a
``BlackBoxClassifier`` whose ``predict_fn`` returns, per image, one-hot [reject, accept] of
"embed, compare with target ``i``'s embedding at the threshold". With a defense
(``--defenses iwmf``: ``IWMF(lambda_0=--lambda-0)``, random) every query of either attack
is a fresh purification, drawn from an explicit ``torch.Generator`` with a fixed seed (its
own stream per attack and pair). Both start from target ``i``'s image (ART:
``x_adv_init``; ours: ``starts``) and, if the system rejects it, from up to 100 uniform-noise
images (both attacks' default; ART draws its noise unseeded). ART runs one pair per
``generate`` call (a batch of 1, so each pair has its own reference). Gradient batches: 100
evaluations at the first iteration, ``100 sqrt(t)`` later, at most 10000 (``--init-eval``,
``--max-eval``; the same for both).

Queries. A query is one image submitted once. ART's are counted exactly by wrapping its
``predict_fn`` (every image passed, including ``generate``'s checks of the source and the
start). Two budgets:

* ``--queries Q`` (default 5000): both attacks get exactly ``Q`` per pair. Ours stops
  itself. ART has no query budget and its step-size search is unbounded, so it runs
  with an unlimited ``max_iter`` and the wrapper stops it (an exception, nothing
  submitted) at the first ``predict`` call that would pass ``Q``: it may use a few
  queries fewer than ``Q`` (the rest of a cut gradient batch; ours uses a cut batch).
* ``--art-max-iter K``: ART runs ``K`` iterations as a user would run it (its count per
  pair, which includes the final success check ``generate`` always makes, is recorded)
  and ours then gets exactly that count for the pair.

What each returns. Ours: its closest boundary point (the minimum over its binary
searches' outputs). ART: the closest point on its own path that its oracle accepted
(every point ART's binary search was handed or returned, recorded by wrapping that
method of the ART instance, and, when ``generate`` returned, its output), since a
stopped ``generate`` returns nothing. A pair is *broken* when that distance is within
the norm's budget (L2 2.0, Linf 0.03), as judged on the attack's own draws. For the
re-scoring both points get the same treatment as our attack's output: projected onto the
eps-ball when beyond it and rounded to 8 bits within it; a pair whose source is accepted
is at distance 0, a pair without any accepted start at inf.

Columns, one row per (defense, norm): ``broken`` pairs within the budget out of N, by ART
and by ours; ``median dist``: median over pairs of the distance reached (in the row's
norm); ``queries``: median over pairs of the queries used; ``s``: seconds for all pairs;
``accepts /20``: each returned image scored through the defense on ``--draws`` (20) fresh
purifications (the same draws for both attacks' images of a pair), median over pairs of
how many accept it (undefended: 0 or 20). With a random defense and ``--repeats 3``
(default; 1 drops it) an extra row ``ours, majority of 3`` runs our attack with each
decision the majority of 3 submissions (3 queries each) at the same budget; its ART
columns are empty (the same ART run as the row above). The output ends with one line per
(defense, norm) saying who broke more pairs at equal queries.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from pathlib import Path

import art
import numpy as np
import torch
from art.attacks.evasion import HopSkipJump as ArtHopSkipJump
from art.estimators.classification import BlackBoxClassifier
from tabulate import tabulate

from iwmf_bench import metrics, registry
from iwmf_bench.attacks.base import AttackTask, make_generator
from iwmf_bench.attacks.budget import fit_l2_ball, quantize_within_budget
from iwmf_bench.attacks.oracle import distances
from iwmf_bench.attacks.hopskipjump import HopSkipJump
from iwmf_bench.defenses.iwmf import IWMF
from iwmf_bench.models.base import frozen
from iwmf_bench.pipeline.folder_pairs import folder_pairs  # the paper's pairs, aligned as a suite cell aligns them

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "iwmfdiff-imgs"

#: our norm name -> (ART's norm, success radius).
NORMS = {"L2": (2, 2.0), "Linf": (np.inf, 0.03)}
ART_BATCH = 64  # images per predict_fn call (ART's own chunking; no effect on the count)


class BudgetSpent(Exception):
    """ART's next ``predict_fn`` call would pass its query budget."""


class CountingPredict:
    """ART's ``predict_fn`` for one pair: per image one-hot [reject, accept] against
    ``reference``, through ``defense`` (one fresh draw per image from ``generator``);
    counts every image as one query and raises :class:`BudgetSpent`, submitting nothing,
    before a call that would pass ``budget`` (None: no cap)."""

    def __init__(self, model, reference, defense, generator, budget):
        self.model, self.reference, self.defense = model, reference, defense
        self.generator, self.budget = generator, budget
        self.queries = 0
        self.source_accepted: bool | None = None  # the first image ART submits is the source

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetSpent
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).clamp(0, 1)  # clamp: float rounding
        if self.defense is not None:
            x = self.defense.purify(x, self.generator)
        score = metrics.scores(self.model.embed(x), self.reference.expand(n, -1), self.model.metric)
        ok = metrics.accepts(score, self.model.threshold, self.model.metric).cpu()
        self.queries += n
        if self.source_accepted is None:
            self.source_accepted = bool(ok[0])
        out = np.zeros((n, 2), dtype=np.float32)
        out[np.arange(n), ok.long().numpy()] = 1.0
        return out


def submitted(point: torch.Tensor, source: torch.Tensor, norm: str, eps: float, dist: float) -> torch.Tensor:
    """The image an attack submits at budget ``eps``, as our attacks make it: ``point``
    projected onto the eps-ball when beyond it, rounded to 8 bits within it."""
    if not math.isfinite(dist):
        point = source
    elif dist > eps:
        delta = point - source
        if norm == "L2":
            point = fit_l2_ball((source + delta * (eps / dist)).clamp(0, 1), source, eps)
        else:
            point = source + delta.clamp(-eps, eps)
    return quantize_within_budget(point[None], source[None], norm, eps)[0]


def run_art(model, source, target, reference, defense, norm, budget, max_iter, args, seed):
    """ART's HopSkipJump on one pair: (closest accepted point, its distance, queries, seconds)."""
    predict = CountingPredict(model, reference, defense, make_generator(seed, "art", "oracle"), budget)
    clf = BlackBoxClassifier(predict, input_shape=tuple(source.shape), nb_classes=2, clip_values=(0.0, 1.0))
    attack = ArtHopSkipJump(clf, batch_size=ART_BATCH, targeted=True, norm=NORMS[norm][0], max_iter=max_iter,
                            max_eval=args.max_eval, init_eval=args.init_eval, init_size=100, verbose=False)
    best = {"dist": math.inf, "point": None}

    def note(point):
        p = torch.as_tensor(np.asarray(point, dtype=np.float32)).view_as(source)
        d = float(distances(p[None], source[None], norm)[0])
        if d < best["dist"]:
            best["dist"], best["point"] = d, p

    search = attack._binary_search  # ART 1.20.1's binary search: its path's accepted points pass through it
    if not callable(search):
        raise RuntimeError("ART's HopSkipJump has no _binary_search to watch; check the ART version")

    def watched(*a, **k):
        note(k["current_sample"] if "current_sample" in k else a[0])
        out = search(*a, **k)
        note(out)
        return out

    attack._binary_search = watched
    np.random.seed(make_generator(seed, "art", "search").initial_seed() % 2 ** 32)  # ART draws from np.random
    x = source.numpy()[None].astype(np.float32)
    start = time.perf_counter()
    try:
        out = attack.generate(x, y=np.array([[0.0, 1.0]], dtype=np.float32),
                              x_adv_init=target.numpy()[None].astype(np.float32))
        if best["point"] is not None:  # ART's own answer is an accepted point of its path too
            note(out[0])
    except BudgetSpent:
        pass
    seconds = time.perf_counter() - start
    if predict.source_accepted:
        return source.clone(), 0.0, predict.queries, seconds
    if best["point"] is None:
        return source.clone(), math.inf, predict.queries, seconds
    return best["point"], best["dist"], predict.queries, seconds


def run_ours(model, source, target, reference, defense, norm, budget, repeats, seed):
    """Our HopSkipJump on one pair: (submitted image, distance before projection, queries, seconds)."""
    attack = HopSkipJump(norm=norm, eps=NORMS[norm][1], max_queries=budget, repeats=repeats)
    task = AttackTask(model=model, sources=source[None], references=reference[None], defense=defense, seed=seed)
    start = time.perf_counter()
    result = attack.run(task, starts=target[None])
    return (result.adversarial[0], float(result.info["distance"][0]), int(result.queries[0]),
            time.perf_counter() - start)


@torch.no_grad()
def accepts_of(model, image, reference, defense, generator, draws) -> int:
    """How many of ``draws`` fresh purifications of ``image`` the system accepts."""
    x = image[None].repeat(draws, 1, 1, 1)
    if defense is not None:
        x = defense.purify(x, generator)
    score = metrics.scores(model.embed(x), reference.expand(draws, -1), model.metric)
    return int(metrics.accepts(score, model.threshold, model.metric).sum())


def summary(runs, n, eps, draws):
    """broken, median distance, median queries, seconds, median accepts for one attack's runs."""
    dist = [r["dist"] for r in runs]
    return [f"{sum(d <= eps for d in dist)}/{n}", f"{statistics.median(dist):.3g}",
            f"{statistics.median(r['queries'] for r in runs):.0f}", f"{sum(r['seconds'] for r in runs):.0f}",
            f"{statistics.median(r['accepts'] for r in runs):g}/{draws}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--queries", type=int, default=5000, help="the query budget of both attacks per pair")
    ap.add_argument("--art-max-iter", type=int, default=None,
                    help="instead of --queries: ART runs this many iterations, ours gets ART's count per pair")
    ap.add_argument("--norms", nargs="+", choices=list(NORMS), default=list(NORMS))
    ap.add_argument("--defenses", nargs="+", choices=["none", "iwmf"], default=["none", "iwmf"])
    ap.add_argument("--lambda-0", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3,
                    help="majority of this many submissions per decision for the extra row (random defense); 1: no row")
    ap.add_argument("--draws", type=int, default=20, help="fresh purifications per returned image when re-scoring")
    ap.add_argument("--init-eval", type=int, default=100)
    ap.add_argument("--max-eval", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", default=str(SHARED / "source"))
    ap.add_argument("--targets", default=str(SHARED / "target"))
    args = ap.parse_args()
    started = time.perf_counter()
    model = frozen(registry.create("models", "dlib-resnet"))
    data = folder_pairs(str(Path(args.sources).resolve()), str(Path(args.targets).resolve()), True, None,
                        "dlib-resnet", model.input_size)
    n = min(args.pairs, data.sources.shape[0])
    x, targets = data.sources[:n], data.targets[:n]
    with torch.no_grad():
        refs = model.embed(targets)
    matched = args.art_max_iter is not None
    art_iters = args.art_max_iter if matched else 10 ** 9  # fixed budget: the counting wrapper stops ART
    defenses = {"none": None, "iwmf": IWMF(lambda_0=args.lambda_0)}
    headers = ["defense", "norm (broken within)", "ours", "broken ART", "broken ours", "median dist ART",
               "median dist ours", "queries ART", "queries ours", "s ART", "s ours",
               f"accepts /{args.draws} ART", f"accepts /{args.draws} ours"]
    rows, verdicts = [], []
    for dname in args.defenses:
        defense = defenses[dname]
        label = "none" if defense is None else f"IWMF {args.lambda_0}"
        for norm in args.norms:
            eps = NORMS[norm][1]
            variants = [1] + ([args.repeats] if defense is not None and args.repeats > 1 else [])
            runs = {"art": [], **{r: [] for r in variants}}
            for i in range(n):
                seed = args.seed + i
                rescore = lambda img: accepts_of(model, img, refs[i], defense,  # noqa: E731 (same draws per pair)
                                                 make_generator(args.seed, "rescore", i), args.draws)
                point, dist, q, s = run_art(model, x[i], targets[i], refs[i], defense, norm,
                                            None if matched else args.queries, art_iters, args, seed)
                runs["art"].append({"dist": dist, "queries": q, "seconds": s,
                                    "accepts": rescore(submitted(point, x[i], norm, eps, dist))})
                budget = q if matched else args.queries
                line = f"{label} {norm} pair {i}: ART {dist:.3g} ({q} q)"
                for r in variants:
                    img, d, qo, so = run_ours(model, x[i], targets[i], refs[i], defense, norm, budget, r, seed)
                    runs[r].append({"dist": d, "queries": qo, "seconds": so, "accepts": rescore(img)})
                    line += f" | ours{'' if r == 1 else f' x{r}'} {d:.3g} ({qo} q)"
                print(line, flush=True)
            art_cols = summary(runs["art"], n, eps, args.draws)
            for r in variants:
                ours_cols = summary(runs[r], n, eps, args.draws)
                a = art_cols if r == 1 else [""] * 5
                rows.append([label, f"{norm} ({eps:g})", "ours" if r == 1 else f"ours, majority of {r}",
                             a[0], ours_cols[0], a[1], ours_cols[1], a[2], ours_cols[2], a[3], ours_cols[3],
                             a[4], ours_cols[4]])
            b_art = sum(r["dist"] <= eps for r in runs["art"])
            b_ours = sum(r["dist"] <= eps for r in runs[1])
            who = "ours broke more" if b_ours > b_art else "ART broke more" if b_art > b_ours else "tie"
            extra = "".join(f"; ours majority-of-{r}: {sum(x_['dist'] <= eps for x_ in runs[r])}/{n}"
                            for r in variants[1:])
            ours_dist = summary(runs[1], n, eps, args.draws)[1]
            verdicts.append(f"{label}, {norm} {eps:g}: {who} at equal queries (ART {b_art}/{n}, ours {b_ours}/{n}"
                            f"{extra}; median distance ART {art_cols[1]}, ours {ours_dist})")
    budget_text = (f"ART {args.art_max_iter} iterations, ours ART's count per pair" if matched
                   else f"{args.queries} queries per pair for both")
    print(f"\ndlib-resnet (threshold {model.threshold}), shared pairs 0..{n - 1} (aligned), {budget_text}, "
          f"init_eval {args.init_eval}, max_eval {args.max_eval}, seed {args.seed}; {args.draws} fresh "
          f"purifications per returned image; {datetime.date.today().isoformat()}, {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, ART {art.__version__}, "
          f"{torch.get_num_threads()} torch threads, {time.perf_counter() - started:.0f} s in all")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print()
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
