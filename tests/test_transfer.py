"""Cross-model transfer (iwmf_bench.pipeline.surrogate): attacks on the raw photo before each
model's alignment, crafted on a surrogate and scored on the cell's model. dlib-resnet
plays both parts here (the only model whose weights every machine has)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iwmf_bench import metrics
from iwmf_bench.align import crop_transform, detect_faces, get_spec, warp_affine
from iwmf_bench.pipeline.build import clear_model_cache, model_named
from iwmf_bench.pipeline.folder_pairs import folder_pairs, folder_photos
from iwmf_bench.pipeline.photo_space import AlignedDefense, AlignedModel, PhotoAlignment
from iwmf_bench.data import load_folder, quantize
from iwmf_bench.errors import BenchError
from iwmf_bench.runner import run_cells
from iwmf_bench.registry import create
from iwmf_bench.suite import load_suite, validate

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("iwmf-bench"))
PAIRS = 4
SUITE = """\
name: xfer
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 4}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.25}}
threat_models:
  from-dlib: {{attack: apgd, setting: transfer, surrogate: dlib-resnet, norm: Linf, eps: 0.03, steps: 5}}
  from-dlib-iwmf: {{attack: apgd, setting: transfer, surrogate: dlib-resnet, surrogate_defense: iwmf,
                   norm: Linf, eps: 0.03, steps: 3, eot_iter: 2, grad_mode: exact}}
evaluation: {{draws: 3}}
"""


@pytest.fixture(scope="module")
def photos(shared_imgs):
    """The 4 pairs' raw source photos, their faces, and dlib-resnet's aligned crops of them."""
    src, tgt = str((shared_imgs / "source").resolve()), str((shared_imgs / "target").resolve())
    clean, faces = folder_photos(src, PAIRS)
    crops = folder_pairs(src, tgt, True, PAIRS, "dlib-resnet", 150)
    return clean, list(faces), crops


@pytest.fixture(scope="module")
def dlib():
    return model_named("dlib-resnet", {}, "cpu")


def test_warp_of_the_clean_photo_is_the_aligned_crop(photos):
    clean, faces, crops = photos
    alignment = PhotoAlignment(clean, faces, "dlib-resnet")
    assert clean.shape == (PAIRS, 3, 160, 160) and crops.sources.shape == (PAIRS, 3, 150, 150)
    torch.testing.assert_close(alignment(clean), crops.sources, rtol=0, atol=1e-6)
    # Any subset, any order (Square re-queries unfinished samples), also perturbed:
    # each photo keeps the warp of the clean photo it perturbs.
    order = [2, 0, 3]
    noise = (torch.rand(clean[order].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.03
    noisy = (clean[order] + noise).clamp(0, 1)
    assert alignment.owners(noisy) == order
    spec = get_spec("dlib-resnet")
    reference = torch.stack([warp_affine(img, crop_transform(faces[j], spec), spec.size)
                             for img, j in zip(noisy, order)])
    torch.testing.assert_close(alignment(noisy), reference, rtol=0, atol=1e-6)


def test_gradients_flow_from_the_embedding_to_the_photo(photos, dlib):
    clean, faces, crops = photos
    model = AlignedModel(dlib, PhotoAlignment(clean, faces, "dlib-resnet"))
    x = clean.clone().requires_grad_(True)
    emb = model.embed(x)
    torch.testing.assert_close(emb, dlib.embed(crops.sources), rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(emb.pow(2).sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().amax(dim=1) > 0).all()  # every photo gets a gradient
    # The gradient is the real one: a central difference along a random direction (float64),
    # zero on saturated pixels so that the photo stays inside [0,1]; the step is tiny because
    # the network's ReLUs and max-pools are kinked (at 1e-4 the difference is already off).
    model64 = AlignedModel(copy.deepcopy(dlib).double(), PhotoAlignment(clean.double(), faces, "dlib-resnet"))
    x64 = clean[:1].double().requires_grad_(True)
    (g64,) = torch.autograd.grad(model64.embed(x64).pow(2).sum(), x64)
    d = torch.randn(x64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d * ((x64 > 0.01) & (x64 < 0.99)).detach()
    f = lambda x: float(model64.embed(x).pow(2).sum())  # noqa: E731
    h = 1e-7
    with torch.no_grad():
        fd = (f(x64 + h * d) - f(x64 - h * d)) / (2 * h)
    assert abs(fd - float((g64 * d).sum())) < 1e-5 * abs(fd)


def test_aligned_defense_purifies_the_crop_with_the_same_randomness(photos):
    clean, faces, crops = photos
    iwmf = create("defenses", "iwmf", lambda_0=0.25)
    view = AlignedDefense(iwmf, PhotoAlignment(clean, faces, "dlib-resnet"))
    assert view.stochastic and view.grad_modes == iwmf.grad_modes
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(view.purify(clean, g1), iwmf.purify(crops.sources, g2), rtol=0, atol=1e-6)
    x = clean.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(view.purify(x, torch.Generator().manual_seed(1), "exact").sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


@pytest.fixture(scope="module")
def tiny_run(shared_imgs, tmp_path_factory):
    config = tmp_path_factory.mktemp("cfg") / "xfer.yaml"
    config.write_text(SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    suite = load_suite(config)
    validate(suite)
    results = tmp_path_factory.mktemp("results")
    records = {r["name"]: r for r in run_cells(suite.cells(), results, progress=False)}
    return suite, results, records


@pytest.mark.slow
def test_same_model_pre_alignment_attack_end_to_end(tiny_run, photos, dlib):
    suite, results, records = tiny_run
    assert {n: r["status"] for n, r in records.items()} == dict.fromkeys(
        ["dlib-resnet/none/from-dlib", "dlib-resnet/none/from-dlib-iwmf",
         "dlib-resnet/iwmf/from-dlib", "dlib-resnet/iwmf/from-dlib-iwmf"], "ok"), \
        {n: r.get("reason") for n, r in records.items()}
    assert len(list((results / "xfer").glob("*.json"))) == 4
    # One set of adversarial photos per surrogate threat model, shared by both defenses.
    saved = sorted((results / "xfer" / "adversarial").glob("photos-*.pt"))
    assert len(saved) == 2
    clean, faces, crops = photos
    undefended = records["dlib-resnet/none/from-dlib"]["metrics"]
    adv = next(saved["adversarial"] for saved in (torch.load(p, weights_only=True) for p in saved)
               if saved["info"]["attack"]["notes"]["surrogate_defense"] is None)
    # The budget holds on the photo: 8-bit, within eps = 0.03 (7/255 after rounding), and used.
    assert torch.equal(quantize(adv), adv)
    linf = float((adv - clean).abs().max())
    assert 6.5 / 255 < linf <= 0.03 + 1e-6 and abs(undefended["attack"]["notes"]["photo_linf"] - linf) < 1e-9
    # Same model as surrogate and target: the white-box photo attack impersonates (real count),
    # and the harness's FAR is what a straightforward re-scoring of the photos gives:
    # detect nothing anew, warp each photo with its clean landmarks, embed, threshold.
    spec = get_spec("dlib-resnet")
    aligned = torch.stack([warp_affine(a, crop_transform(f, spec), spec.size) for a, f in zip(adv, faces)])
    with torch.no_grad():
        s = metrics.scores(dlib.embed(aligned), dlib.embed(crops.targets), dlib.metric)
    accepted = int(metrics.accepts(s, dlib.threshold, dlib.metric).sum())
    assert undefended["far"]["k"] == accepted and undefended["far"]["n"] == PAIRS
    assert undefended["far"]["value"] >= 0.75
    # Through IWMF the same photos are scored on 3 fresh draws each.
    through = records["dlib-resnet/iwmf/from-dlib"]["metrics"]
    assert through["draws"] == 3 and through["far"]["n"] == 3 * PAIRS
    assert through["frr_genuine"] == records["dlib-resnet/iwmf/from-dlib-iwmf"]["metrics"]["frr_genuine"]
    crafted_through_iwmf = records["dlib-resnet/iwmf/from-dlib-iwmf"]["metrics"]
    assert crafted_through_iwmf["attack"]["notes"]["photo_linf"] <= 0.03 + 1e-6
    assert crafted_through_iwmf["attack"]["flags"]["randomness_without_eot"] is False
    assert crafted_through_iwmf["attack"]["notes"]["surrogate"] == "dlib-resnet"


BAD = [
    ("surrogate: dlib-resnet,", "surrogate: nope,", r"threat_models\.from-dlib\.surrogate: unknown model 'nope'"),
    ("setting: transfer, surrogate: dlib-resnet, norm: Linf, eps: 0.03, steps: 5",
     "setting: adaptive, surrogate: dlib-resnet, norm: Linf, eps: 0.03, steps: 5",
     r"threat_models\.from-dlib: surrogate needs an attack with setting: transfer"),
    ("surrogate_defense: iwmf,", "surrogate_defense: jpg,",
     r"threat_models\.from-dlib-iwmf\.surrogate_defense: no defense labelled 'jpg' in the suite \(has: none, iwmf\)"),
    ("surrogate: dlib-resnet, surrogate_defense", "surrogate_defense",
     r"threat_models\.from-dlib-iwmf: surrogate_defense needs surrogate: MODEL"),
    ("align: true", "align: false", r"threat_models\.from-dlib: surrogate attacks perturb the photos before"),
]


@pytest.mark.parametrize("old,new,message", BAD, ids=["unknown", "adaptive", "defense", "no-surrogate", "no-align"])
def test_invalid_surrogate_options_fail_at_load_with_one_line(shared_imgs, tmp_path, old, new, message):
    text = SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target")
    assert old in text
    config = tmp_path / "bad.yaml"
    config.write_text(text.replace(old, new))
    with pytest.raises(BenchError, match=message):
        load_suite(config)
    if old == BAD[0][0]:  # the command line: exit 2, one line, nothing run
        r = subprocess.run([EXE, "run", "--all", "--config", str(config), "--results", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        assert "unknown model 'nope'" in r.stderr and not (tmp_path / "r").exists()


def test_missing_surrogate_weights_are_predicted_and_skipped(shared_imgs, tmp_path, monkeypatch):
    from iwmf_bench.pipeline.compute import run_cell
    from iwmf_bench.runner import predict_skips

    config = tmp_path / "s.yaml"
    config.write_text(SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target")
                      .replace("surrogate: dlib-resnet, norm: Linf, eps: 0.03, steps: 5",
                               "surrogate: faceres, norm: Linf, eps: 0.03, steps: 5"))
    suite = load_suite(config)
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path / "empty-home"))  # no faceres weights here
    clear_model_cache()  # a faceres built by an earlier test must not answer for this home
    try:
        predicted = {c.name for c in suite.cells() if c.key in predict_skips(suite.cells())}
        assert predicted == {"dlib-resnet/none/from-dlib", "dlib-resnet/iwmf/from-dlib"}  # crafted on faceres
        cell = next(c for c in suite.cells() if c.name == "dlib-resnet/none/from-dlib")
        record = run_cell(cell, None)
        assert record["status"] == "skipped" and "iwmf-bench fetch faceres" in record["reason"]
    finally:
        clear_model_cache()


@pytest.mark.slow
def test_sanity_notes_compare_cross_model_cells_only_with_the_same_surrogate(tiny_run):
    from iwmf_bench.leaderboard import sanity_notes

    _, _, records = tiny_run
    apgd = records["dlib-resnet/iwmf/from-dlib"]
    far = apgd["metrics"]["far"]
    assert far["k"] < far["n"]  # so a black-box count one higher exists

    def square(surrogate):
        r = json.loads(json.dumps(apgd))
        r["cell"]["threat"] = "square"
        opts = {"attack": "square", "setting": "transfer", "norm": "Linf", "eps": apgd["cell"]["threat_options"]["eps"]}
        r["cell"]["threat_options"] = {**opts, "surrogate": surrogate} if surrogate else opts
        r["metrics"]["far"] = {**far, "k": far["k"] + 1, "value": (far["k"] + 1) / far["n"]}
        return r

    beats = [n for n in sanity_notes([apgd, square("dlib-resnet")]) if "beats white-box" in n]
    assert len(beats) == 1 and "square" in beats[0] and "from-dlib" in beats[0]
    # Square on the model itself vs APGD crafted on a surrogate: another question, no note.
    assert not [n for n in sanity_notes([apgd, square(None)]) if "beats white-box" in n]


def test_threats_lists_never_enter_surrogate_cells_keys(shared_imgs, tmp_path):
    """A model or defense entry's `threats:` list only picks columns: editing it must not
    change the key of a cell crafted on that entry as a surrogate (it once did)."""
    text = SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target")
    keys = []
    for models, iwmf in (("{dlib-resnet: {}}", "{defense: iwmf, lambda_0: 0.25}"),
                         ("{dlib-resnet: {threats: [from-dlib, from-dlib-iwmf]}}",
                          "{defense: iwmf, lambda_0: 0.25, threats: [from-dlib, from-dlib-iwmf]}")):
        config = tmp_path / f"s{len(keys)}.yaml"
        config.write_text(text.replace("models: {dlib-resnet: {}}", f"models: {models}")
                          .replace("iwmf: {defense: iwmf, lambda_0: 0.25}", f"iwmf: {iwmf}"))
        keys.append({c.name: c.key for c in load_suite(config).cells()})
    assert keys[0] == keys[1] and len(keys[0]) == 4
