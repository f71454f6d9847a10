"""Stage 3, score: purify on fresh randomness, then FAR, FRR and seconds per image.

* :func:`genuine`: the victims' reference embeddings, seconds per image of
  purification and the FRR of purified genuine images. It is the same for every threat
  model of a (model, defense), so it is computed once per process.
* :func:`score`: the crafted images (rounded to 8 bits: what an attacker submits),
  purified on draws no attack saw: FAR single-shot and worst-of-N (for dodging: the
  rate of rejected probes), the FRR of purified adversarial images against their true
  identity, and for dataset sources the listed genuine pairs' FRR and the clean ROC.

Generator streams keep the names they had when this stage lived in ``harness.py``
(``"harness"``, ``"dataset"``): renaming one would move every committed number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .. import metrics, roc
from ..attacks.base import TOLERANCE, is_random, make_generator
from ..data import quantize
from ..errors import BenchError
from ..scoring import FRESH_STREAM, evaluate
from ..util import batched
from .cell import Cell
from .craft import Crafted, attack_pairs
from .outcome import DEPLOYMENTS, AttackFacts, CellMetrics, DeploymentRates, PerPair, Votes, attack_success
from .pairs import Pairs


@dataclass
class Genuine:
    refs: torch.Tensor  # targets' embeddings (impersonation references)
    source_refs: torch.Tensor  # sources' clean embeddings
    seconds_per_image: float
    votes: Votes  # per same-identity pair, accepted draws of the purified genuine image


def cross_identity_votes(embs, ref: torch.Tensor, labels: list[int], threshold: float, metric: str) -> Votes:
    """Over same-identity pairs (i, j), i != j (row-major order), how many draws accept
    image i (processed; ``embs``: one embedding batch per draw) against clean image j."""
    la = torch.as_tensor(list(labels))
    pairs = (la.view(-1, 1) == la.view(1, -1)) & ~torch.eye(len(la), dtype=torch.bool)
    scores = torch.stack([metrics.pair_scores(e.to(ref.device), ref, metric).cpu()[pairs] for e in embs], dim=1)
    return votes_of(scores, threshold, metric)


def votes_of(scores: torch.Tensor, threshold: float, metric: str) -> Votes:
    """Votes of trials from their scores, ``(trials, draws)``, at ``threshold``; the scores kept."""
    counts = metrics.accepts(scores, threshold, metric).long().sum(dim=1)
    return Votes(scores.shape[1], [int(c) for c in counts.tolist()], metrics.score_values(scores))


def matched_votes(embs, refs: torch.Tensor, threshold: float, metric: str) -> Votes:
    """Per row i, how many draws accept image i (``embs``: one batch per draw) against reference i."""
    scores = torch.stack([metrics.scores(e.to(refs.device), refs, metric).cpu() for e in embs], dim=1)
    return votes_of(scores, threshold, metric)


def draws_of(cell: Cell, defense, x: torch.Tensor) -> int:
    """Purifications per image at scoring: the cell's ``evaluation.draws`` for a random
    defense, one for a deterministic one (the test :func:`evaluate` applies)."""
    return cell.draws if is_random(defense, x, cell.seed) else 1


_GENUINE: dict[str, Genuine] = {}  # per process, by the (model, defense, data, seed) identity


def genuine(cell: Cell, model, defense, pairs: Pairs) -> Genuine:
    """The genuine stage of the cell's (model, defense): computed once per process (same
    generator, so the same numbers as computing it per cell)."""
    ident = cell.derived(threat="-", threat_options={}).key
    if ident in _GENUINE:
        return _GENUINE[ident]
    dev, batch = cell.device, cell.batch_size
    targets, sources, n = pairs.targets.to(dev), pairs.sources.to(dev), pairs.sources.shape[0]
    refs = batched(model.embed, targets, batch)
    source_refs = batched(model.embed, sources, batch)
    gen = make_generator(cell.seed, "harness", "genuine")
    with torch.no_grad():  # warm-up (lazy loading, JIT caches) stays out of the timing
        defense.purify(targets[:1], make_generator(cell.seed, "harness", "warm-up"))
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    purified = batched(lambda x: defense.purify(x, gen), targets, batch)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    seconds_per_image = (time.perf_counter() - start) / n  # the first draw's
    embs = [batched(model.embed, purified, batch)]
    with torch.no_grad():  # the other draws, from the same generator
        for _ in range(draws_of(cell, defense, targets) - 1):
            embs.append(batched(model.embed, batched(lambda x: defense.purify(x, gen), targets, batch), batch))
    votes = cross_identity_votes(embs, refs, pairs.target_labels, model.threshold, model.metric)
    if len(_GENUINE) >= 64:
        _GENUINE.pop(next(iter(_GENUINE)))
    _GENUINE[ident] = Genuine(refs, source_refs, seconds_per_image, votes)
    return _GENUINE[ident]


def references(cell: Cell, model, pairs: Pairs, gen: Genuine) -> torch.Tensor:
    """Embeddings of the attack's references: the targets (impersonation), or the probes'
    own identities (dodging)."""
    if cell.goal != "dodging":
        return gen.refs
    return batched(model.embed, attack_pairs(pairs, "dodging")[1].to(cell.device), cell.batch_size)


def score(cell: Cell, model, defense, pairs: Pairs, gen: Genuine, crafted: Crafted, refs: torch.Tensor) -> CellMetrics:
    """The metrics of one cell (see the module docstring); ``refs``: :func:`references`.

    Every deployment's rates come from the same draws: the ``draws`` purifications of each
    adversarial image (scored against the attack's reference and, for the FRR of
    adversarial images, against their true identity) and of each genuine image."""
    goal = cell.goal
    seen_through = crafted.scoring_defense or defense
    n_draws = cell.draws
    ev = evaluate(model, seen_through, crafted.adversarial, refs, cell.seed, n_draws=n_draws, goal=goal)
    labels = attack_pairs(pairs, goal)[2]
    info = crafted.info
    min_eps = None
    if "min_eps" in info:  # a minimal-budget attack: the per-pair budgets, summarized
        m = info["min_eps"]
        min_eps = {**minimal_budgets(m["min_eps"]), "failed_eps": m["failed_eps"], "converged": m["converged"]}
    if pairs.listed_genuine:  # dataset sources: listed genuine pairs, attacker references, clean ROC
        genuine_votes, adv_votes, clean = listed_pair_metrics(cell, model, defense, pairs, ev)
    else:  # the folder protocol's probes are the sources for either goal
        genuine_votes, clean = gen.votes, None
        adv_votes = cross_identity_votes(list(ev.embeddings), gen.source_refs, labels, model.threshold, model.metric)
    adv_votes.scores = None  # decisions only: the scores kept are the attack's and the genuine images
    per_pair = per_pair_record(pairs, goal, crafted, ev, min_eps)
    check_within_budget(cell, per_pair)
    # The votes (with every draw's score) always; deployments where there is more than one draw.
    votes, deployments = {"genuine": genuine_votes, "adversarial_true_identity": adv_votes}, None
    if max(genuine_votes.draws, adv_votes.draws, ev.n_draws) > 1:
        deployments = {d: DeploymentRates(attack_success(per_pair.successes, ev.n_draws, d, goal),
                                          genuine_votes.rate(d, rejected=True), adv_votes.rate(d, rejected=True))
                       for d in DEPLOYMENTS}
    return CellMetrics(
        goal=goal, success=ev.single_shot, success_worst_of_n=ev.worst_of_n, draws=ev.n_draws,
        pairs=crafted.adversarial.shape[0], frr_genuine=genuine_votes.rate("single-shot", rejected=True),
        frr_adv_true_identity=adv_votes.rate("single-shot", rejected=True),
        seconds_per_image=gen.seconds_per_image, threshold=model.threshold, metric=model.metric,
        per_pair=per_pair, attack=AttackFacts.from_dict(info["attack"]) if "attack" in info else None,
        defense_report=defense.report(cell.device), min_eps=min_eps, clean=clean,
        dropped_pairs_no_face=pairs.dropped_pairs_no_face if pairs.dropped_pairs_no_face or pairs.listed_genuine
        else None, votes=votes, deployments=deployments,
        fresh_draws=fresh_draws(cell, model, seen_through, crafted, refs) if cell.randomness == "known" else None)


def fresh_draws(cell: Cell, model, defense, crafted: Crafted, refs: torch.Tensor) -> dict:
    """Known randomness: the images on draws the attacker did not know (a stream of their
    own), each deployment's success and the per-pair successes."""
    ev = evaluate(model, defense, crafted.adversarial, refs, cell.seed, n_draws=cell.draws,
                  goal=cell.goal, stream=FRESH_STREAM)
    successes = ev.successes(cell.goal)
    return {"draws": ev.n_draws, "successes": successes,
            **{d: attack_success(successes, ev.n_draws, d, cell.goal) for d in DEPLOYMENTS}}


def per_pair_record(pairs: Pairs, goal: str, crafted: Crafted, ev, min_eps: dict | None) -> PerPair:
    """What each pair's rates are computed from, so anyone can take the union over threat
    models, run a paired test or re-score: successes out of ``draws`` fresh purifications
    (acceptances; for dodging, rejections), the submitted 8-bit image's distance to the
    aligned probe in Linf and L2 (the budget plus at most half a level of rounding; None
    for images crafted on another space, e.g. a surrogate's photos), the attack's queries
    or gradient steps, min-eps's budget, and the pair's identities."""
    probes, _, labels = attack_pairs(pairs, goal)
    adv = quantize(crafted.adversarial).cpu().double()
    if adv.shape == probes.shape:
        delta = (adv - probes.cpu().double()).flatten(1)
        linf, l2 = delta.abs().amax(1).tolist(), delta.norm(dim=1).tolist()
    else:
        linf = l2 = None
    refs = pairs.target_labels if goal == "impersonation" else labels
    return PerPair(draws=ev.n_draws, successes=ev.successes(goal), linf=linf, l2=l2,
                   queries=crafted.info.get("queries"), min_eps=min_eps["values"] if min_eps else None,
                   probe_identity=[str(x) for x in labels], reference_identity=[str(x) for x in refs],
                   probe=list(pairs.source_names) if len(pairs.source_names) == len(labels) else None,
                   scores=metrics.score_values(ev.scores), attack=crafted.info.get("per_pair"))


def check_within_budget(cell: Cell, per_pair: PerPair) -> None:
    """Every scored image lies within the threat model's budget around its aligned probe
    (attacks round inside the ball: :func:`~iwmf_bench.attacks.budget.quantize_within_budget`);
    a scored image outside it is a bug, never a number to report."""
    t = cell.threat_options
    sizes = {"Linf": per_pair.linf, "L2": per_pair.l2}.get(t.get("norm", "Linf"))
    if not t.get("attack") or t.get("eps") is None or sizes is None:
        return
    worst = max(sizes, default=0.0)
    if worst > float(t["eps"]) + TOLERANCE:
        raise BenchError(f"{cell.name}: a scored image lies {worst:.6g} from its probe in {t.get('norm', 'Linf')}, "
                         f"beyond the budget eps {t['eps']}; the attack must round inside its budget")


def minimal_budgets(values: list[float]) -> dict:
    """Each pair's smallest breaking budget (``None``: not broken within the attack's
    ``eps``; JSON has no infinity), their median with a distribution-free 95% interval
    (``None`` where it is unbounded), and the broken rate."""
    values = [float("inf") if v is None else float(v) for v in values]
    median, lo, hi = metrics.median_interval(values)
    clean = lambda v: v if math.isfinite(v) else None  # noqa: E731
    broken = metrics.Rate(sum(math.isfinite(v) for v in values), len(values))
    return {"values": [clean(v) for v in values], "median": clean(median), "ci95": [clean(lo), clean(hi)],
            "broken": broken.to_dict()}


@torch.no_grad()
def listed_pair_metrics(cell: Cell, model, defense, pairs: Pairs, ev) -> tuple[Votes, Votes, dict | None]:
    """Votes of the genuine pairs (purified probe vs clean reference, ``draws`` draws), of
    the purified adversarial images (the draws of ``ev``) against another image of the
    attacker (dodging: against the probe's reference), and clean verification (TAR@FAR,
    AUC, EER, scores for the ROC) of the defense on the genuine pairs and the impersonation
    pairs taken clean, one draw (None without pairs of both kinds)."""
    dev, batch, thr, metric = cell.device, cell.batch_size, model.threshold, model.metric
    emb = lambda x: batched(model.embed, x.to(dev), batch).cpu()  # noqa: E731
    gen = {s: make_generator(cell.seed, "dataset", s) for s in ("genuine", "impostor")}
    purify = lambda x, stream: batched(lambda z: defense.purify(z, gen[stream]), x.to(dev), batch)  # noqa: E731
    genuine_b = emb(pairs.genuine_b)
    genuine_embs = [emb(purify(pairs.genuine_a, "genuine"))]
    if pairs.genuine_a.shape[0]:
        genuine_embs += [emb(purify(pairs.genuine_a, "genuine"))
                         for _ in range(draws_of(cell, defense, pairs.genuine_a) - 1)]
    genuine_scores = metrics.scores(genuine_embs[0], genuine_b, metric)
    impostor_scores = metrics.scores(emb(purify(pairs.sources, "impostor")), emb(pairs.targets), metric)
    draws = list(ev.embeddings)
    if cell.goal == "dodging":
        adv_true = matched_votes(draws, genuine_b, thr, metric)
    elif pairs.attacker_ref_rows:
        rows = pairs.attacker_ref_rows
        adv_true = matched_votes([e[rows] for e in draws], emb(pairs.attacker_refs), thr, metric)
    else:
        adv_true = Votes(len(draws), [])
    clean = None
    if genuine_scores.numel() and impostor_scores.numel():
        clean = {**roc.clean_summary(genuine_scores, impostor_scores, metric),
                 "genuine_scores": genuine_scores.tolist(), "impostor_scores": impostor_scores.tolist()}
    return matched_votes(genuine_embs, genuine_b, thr, metric), adv_true, clean
