"""The field's attack suites (AutoAttack, torchattacks) through the verification adapter:
the adapter's logits against our objective, cross-checks against our APGD and Square on
dlib-resnet with the shared images, each listed torchattacks class end to end, suite
validation, the optional-extra packaging, and the leaderboard's weaker-than-reference flag.

Reproducibility: both libraries draw from torch's global RNG; the wrappers seed it from
the task seed and restore it (``classifier_run.seeded_global_rng``), so runs are
bit-reproducible for a seed; ``test_torchattacks_end_to_end`` checks it on DIFGSM (random
input diversity) and the AutoAttack tests on APGD-CE (random start).
"""

import importlib.metadata
import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iwmf_bench import metrics, registry
from iwmf_bench.scoring import evaluate
from iwmf_bench.attacks.apgd import APGD
from iwmf_bench.attacks.base import AttackTask, check_deterministic
from iwmf_bench.attacks.budget import check_budget, on_8bit_grid
from iwmf_bench.attacks.classifier import VerificationClassifier
from iwmf_bench.attacks.square import Square
from iwmf_bench.data import load_folder
from iwmf_bench.defenses.base import NoDefense
from iwmf_bench.errors import BenchError
from iwmf_bench.leaderboard import weaker_than_reference
from iwmf_bench.suite import load_suite, validate
from conftest import align_shared_pairs

from test_attacks import TinyFace, images  # noqa: E402  (tests/ is on sys.path)

pytest.importorskip("pyautoattack", reason="the [suites] extra is installed by scripts/setup.sh")
pytest.importorskip("torchattacks", reason="the [suites] extra is installed by scripts/setup.sh")

from iwmf_bench.attacks.autoattack import AutoAttack  # noqa: E402
from iwmf_bench.attacks.torchattacks_attack import TorchAttacks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 8
STEPS = 10
SQUARE_QUERIES = 30
SEED = 0


# -- the adapter -------------------------------------------------------------------------


def test_adapter_logits_are_the_goal_signed_margin():
    model = TinyFace()
    src, tgt = images(4, seed=1), images(4, seed=2)
    with torch.no_grad():
        refs = model.embed(tgt)
    for goal in ("impersonation", "dodging"):
        clf = VerificationClassifier(model, refs, src, goal=goal, norm="Linf")
        x = (src + 0.01).clamp(0, 1)
        logits = clf(x)
        ours = APGD(goal=goal).objective(AttackTask(model, src, refs), x)
        assert torch.allclose(logits[:, 1] - logits[:, 0], ours) and torch.equal(logits[:, 0], -logits[:, 1])
        # CE on label 0 is softplus(margin): increasing in the margin
        assert torch.allclose(F.cross_entropy(logits, clf.labels(), reduction="none"), F.softplus(ours))
        # a subset (as AutoAttack passes the samples not yet fooled) keeps each row's reference
        assert torch.allclose(clf(x[[3, 1]]), logits[[3, 1]])
    assert clf.forward_passes == 4 + 2  # rows passed through the system (queries)


# -- dlib-resnet on the shared images ------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(shared_imgs, tmp_path_factory):
    folders = align_shared_pairs(shared_imgs, tmp_path_factory.mktemp("suites-aligned"), "dlib-resnet", PAIRS)
    model = registry.create("models", "dlib-resnet").eval()
    src, tgt = load_folder(folders["source"]), load_folder(folders["target"])
    with torch.no_grad():
        refs = model.embed(tgt.images)
    return model, src.images, refs


def _far(model, result, refs):
    return evaluate(model, None, result.adversarial, refs, SEED).single_shot


@pytest.mark.slow
def test_autoattack_apgd_ce_within_our_apgd_interval(pairs):
    model, src, refs = pairs
    task = AttackTask(model, src, refs, seed=SEED)
    ours = APGD(norm="Linf", eps=0.03, steps=STEPS).run(task)
    rng = torch.get_rng_state()
    ref = check_deterministic(AutoAttack(norm="Linf", eps=0.03, attacks=["apgd-ce"], steps=STEPS), task)
    assert torch.equal(torch.get_rng_state(), rng)  # the library's global seeding is undone
    far_ours, far_ref = _far(model, ours, refs), _far(model, ref, refs)
    print(f"\nLinf 0.03, {STEPS} steps: our APGD {far_ours}; AutoAttack APGD-CE {far_ref}")
    lo, hi = far_ours.interval
    assert lo <= far_ref.value <= hi
    check_budget(ref.adversarial, src, "Linf", 0.03)
    assert on_8bit_grid(ref.adversarial) and ref.info["quantized_8bit"]
    # AutoAttack's clean pass and 7 check passes, APGD's own clean prediction, the start and
    # one pass per step, the final prediction: every sample (all attacked in one batch)
    assert torch.equal(ref.queries, torch.full((PAIRS,), 8 + 1 + (STEPS + 1) + 1))
    assert "global RNG" in ref.info["rng"]
    assert not ref.raised_flags()


@pytest.mark.slow
def test_autoattack_square_within_our_square_interval(pairs):
    model, src, refs = pairs
    task = AttackTask(model, src, refs, seed=SEED)
    ours = Square(norm="Linf", eps=0.03, queries=SQUARE_QUERIES).run(task)
    ref = AutoAttack(norm="Linf", eps=0.03, attacks=["square"], queries=SQUARE_QUERIES).run(task)
    far_ours, far_ref = _far(model, ours, refs), _far(model, ref, refs)
    print(f"\nLinf 0.03, {SQUARE_QUERIES} queries: our Square {far_ours}; AutoAttack Square {far_ref}")
    lo, hi = far_ours.interval
    assert lo <= far_ref.value <= hi
    check_budget(ref.adversarial, src, "Linf", 0.03)
    # Square's own budget plus AutoAttack's checks (clean pass, 7 check passes, final prediction)
    assert int(ref.queries.max()) <= SQUARE_QUERIES + 12


TORCHATTACKS = [
    ("PGD", {"steps": 2}, 2),
    ("MIFGSM", {"steps": 2}, 2),
    ("DIFGSM", {"steps": 2, "diversity_prob": 1.0}, 2),
    ("TIFGSM", {"steps": 2}, 2),
    ("VMIFGSM", {"steps": 2, "N": 2}, 2 * (1 + 2)),
    ("CW", {"steps": 4, "c": 1000.0, "lr": 0.01}, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,options,queries", TORCHATTACKS, ids=[t[0] for t in TORCHATTACKS])
def test_torchattacks_end_to_end(pairs, name, options, queries):
    model, src, refs = pairs
    src, refs = src[:3], refs[:3]
    norm, eps = ("L2", 1.0) if name == "CW" else ("Linf", 0.03)
    attack = registry.create("attacks", "torchattacks", name=name, eps=eps, **options)
    assert attack.norm == norm
    task = AttackTask(model, src, refs, seed=SEED)
    rng = torch.get_rng_state()
    result = check_deterministic(attack, task) if name == "DIFGSM" else attack.run(task)
    assert torch.equal(torch.get_rng_state(), rng)
    check_budget(result.adversarial, src, norm, eps)  # [0,1] and the budget, after 8-bit rounding
    assert on_8bit_grid(result.adversarial) and result.info["quantized_8bit"]
    if queries is not None:
        assert torch.equal(result.queries, torch.full((3,), queries))
    moved = (result.adversarial - src).flatten(1).abs().amax(dim=1)
    before = evaluate(model, None, src, refs, SEED).margin.mean()
    after = evaluate(model, None, result.adversarial, refs, SEED).margin.mean()
    print(f"\n{name} {options}: max perturbation {moved.tolist()}, mean margin {before:.3f} -> {after:.3f}, "
          f"projected {result.info['projected']}, queries {result.queries.tolist()}")
    # a few steps must move the images towards their targets. CW returns a sample it never
    # fooled unchanged; those it fooled come back projected onto the L2 ball (its result is
    # minimum-norm, unbounded). Measured: mean margin -0.18 -> -0.07, 2 of 3 moved, both projected.
    assert float(after) > float(before)
    if name == "CW":
        assert int((moved > 0).sum()) >= 1 and result.info["projected"] >= 1
    else:
        assert bool((moved > 0).all())
    assert not result.raised_flags()


# -- validation, skipped cells, packaging ----------------------------------------------------


def _suite(tmp_path, threat: str):
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
name: t
data: {{sources: {tmp_path}/s, targets: {tmp_path}/t, align: false, pairs: 2}}
models: {{dlib-resnet: {{}}}}
defenses: {{none: {{defense: none}}}}
threat_models:
  x: {threat}
""")
    return load_suite(path)


@pytest.mark.parametrize("threat,message", [
    ("{attack: torchattacks, name: APGDT, eps: 0.03}", "APGDT cannot run on face verification"),
    ("{attack: torchattacks, name: OnePixel}", "L0 attack"),
    ("{attack: torchattacks, name: APGD, loss: dlr}", "needs >= 3 classes"),
    ("{attack: torchattacks, name: MIFGSM, stepz: 3}", "MIFGSM does not take stepz"),
    ("{attack: torchattacks, name: CW, norm: Linf}", "CW is an L2 attack"),
    ("{attack: autoattack, attacks: [apgd-ce, apgd-t]}", "'apgd-t' cannot run on two-class verification"),
])
def test_suite_validation_names_the_problem(tmp_path, threat, message):
    with pytest.raises(BenchError) as err:
        validate(_suite(tmp_path, threat))
    text = str(err.value)
    assert message in text and "threat_models.x" in text and "\n" not in text


def test_suite_validation_accepts_library_options(tmp_path):
    validate(_suite(tmp_path, "{attack: torchattacks, name: DIFGSM, eps: 0.03, steps: 10, decay: 1.0}"))
    validate(_suite(tmp_path, "{attack: autoattack, norm: L2, eps: 2.0, steps: 10, attacks: [square]}"))


def test_missing_library_gives_a_skipped_row(shared_imgs, tmp_path, monkeypatch):
    from iwmf_bench.pipeline.compute import run_cell

    for kind in ("source", "target"):  # two pairs, resized rather than aligned: seconds
        (tmp_path / kind).mkdir()
        for path in sorted((shared_imgs / kind).iterdir())[:2]:
            shutil.copy(path, tmp_path / kind / path.name)
    from iwmf_bench.runner import predict_skips

    suite = load_suite(_write(tmp_path))
    assert not predict_skips(suite.cells())  # both libraries are installed in the dev venv
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` now fails
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    # Predicted before anything runs (the progress bar and ETA count only computed cells) ...
    assert predict_skips(suite.cells()) == {c.key for c in suite.cells()}
    for cell in suite.cells():  # ... and skipped when run
        record = run_cell(cell, None)
        assert record["status"] == "skipped", record
        assert "pip install 'iwmf-bench[suites]'" in record["reason"]


def _write(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
name: t
device: cpu
data: {{sources: {tmp_path}/source, targets: {tmp_path}/target, align: false}}
models: {{dlib-resnet: {{}}}}
defenses: {{none: {{defense: none}}}}
threat_models:
  ta: {{attack: torchattacks, name: PGD, eps: 0.03, steps: 1}}
  aa: {{attack: autoattack, setting: adaptive, eps: 0.03, steps: 1, attacks: [apgd-ce]}}
""")
    return path


def test_default_install_does_not_pin_requests():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    default = " ".join(project["dependencies"]).lower()
    assert "requests" not in default and "torchattacks" not in default and "autoattack" not in default
    assert sorted(project["optional-dependencies"]["suites"]) == ["pyautoattack==0.2.0", "torchattacks==3.5.1"]
    # the installed metadata agrees: requests only ever comes in through an extra
    for req in importlib.metadata.requires("iwmf-bench") or []:
        if req.lower().startswith(("requests", "torchattacks", "pyautoattack")):
            assert "extra ==" in req, req
    # and this environment keeps a current requests despite torchattacks' pin (~=2.25.1)
    major, minor = (int(p) for p in importlib.metadata.version("requests").split(".")[:2])
    assert (major, minor) > (2, 25)


# -- EOT over a deterministic defense, the leaderboard flag ---------------------------------------


def test_square_eot_over_a_deterministic_defense_costs_one_query_per_step():
    model = TinyFace()
    src, tgt = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        refs = model.embed(tgt)
    model.threshold = 0.999  # out of reach: every sample uses the whole budget
    r = Square(queries=20, eot_iter=4).run(AttackTask(model, src, refs, defense=NoDefense()))
    assert torch.equal(r.queries, torch.full((3,), 20)) and r.info["eot_iter_used"] == 1
    assert "deterministic" in r.info["eot_note"]
    same = Square(queries=20, eot_iter=1).run(AttackTask(model, src, refs, defense=NoDefense()))
    assert torch.equal(r.adversarial, same.adversarial)  # the same 19 search steps


def _record(defense, threat, options, k, n=20):
    """A finished cell whose attack broke k of n pairs (one draw each)."""
    from iwmf_bench.pipeline.outcome import CellMetrics, PerPair

    rate = metrics.Rate(k, n)
    per_pair = PerPair(draws=1, successes=[1] * k + [0] * (n - k), linf=None, l2=None, queries=None, min_eps=None,
                       probe_identity=["25"] * n, reference_identity=["0"] * n, probe=None)
    m = CellMetrics(goal="impersonation", success=rate, success_worst_of_n=rate, draws=1, pairs=n,
                    frr_genuine=metrics.Rate(0, n), frr_adv_true_identity=metrics.Rate(0, n), seconds_per_image=0.0,
                    threshold=0.6, metric="euclidean", per_pair=per_pair)
    return {"status": "ok", "cell": {"defense": defense, "threat": threat,
                                     "threat_options": {"setting": "transfer", "norm": "Linf", "eps": 0.03, **options}},
            "metrics": json.loads(json.dumps(m.to_dict()))}


def test_leaderboard_flags_ours_weaker_than_the_reference():
    ours = _record("none", "apgd-linf", {"attack": "apgd"}, 5)
    ref = _record("none", "aa-apgd", {"attack": "autoattack", "attacks": ["apgd-ce"]}, 18)
    close = _record("none", "aa-apgd", {"attack": "autoattack", "attacks": ["apgd-ce"]}, 9)
    square_ref = _record("none", "aa-square", {"attack": "autoattack", "attacks": ["square"]}, 18)
    other_eps = _record("none", "aa-apgd", {"attack": "autoattack", "attacks": ["apgd-ce"], "eps": 0.01}, 18)
    (note,) = weaker_than_reference([ours, ref])
    assert "our apgd-linf (25.0%) is weaker than the reference aa-apgd (90.0%)" in note
    assert weaker_than_reference([ours, close]) == []  # overlapping intervals
    assert weaker_than_reference([ours, square_ref]) == []  # another family
    assert weaker_than_reference([ours, other_eps]) == []  # another budget
    assert weaker_than_reference([ref, ours]) == [note]
