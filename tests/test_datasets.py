"""Dataset plugins on trees built at test time from the shared images: LFW layout with
pairs.txt (both line forms, 2 folds), a CelebA-style identity list, a verification .bin
written here, the restricted unpickler, and one-line errors for bad inputs."""

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from iwmf_bench import registry
from iwmf_bench.cli import main
from iwmf_bench.data import read_image
from iwmf_bench.datasets import DatasetError, open_dataset
from iwmf_bench.datasets.verification_bin import safe_load

PEOPLE = {"Ann_Lee": ("source", 25), "Bob_Ray": ("source", 26), "Cid_Moe": ("target", 0), "Dee_Fox": ("target", 1)}
# (fold, name_a, num_a, name_b, num_b): 2 folds x (3 matched + 3 mismatched)
PAIRS = [
    (0, "Ann_Lee", 1, "Ann_Lee", 2), (0, "Bob_Ray", 3, "Bob_Ray", 9), (0, "Cid_Moe", 4, "Cid_Moe", 10),
    (0, "Ann_Lee", 5, "Dee_Fox", 1), (0, "Bob_Ray", 2, "Cid_Moe", 7), (0, "Dee_Fox", 3, "Ann_Lee", 10),
    (1, "Dee_Fox", 2, "Dee_Fox", 8), (1, "Ann_Lee", 3, "Ann_Lee", 4), (1, "Bob_Ray", 1, "Bob_Ray", 10),
    (1, "Cid_Moe", 1, "Bob_Ray", 5), (1, "Ann_Lee", 6, "Bob_Ray", 6), (1, "Dee_Fox", 9, "Cid_Moe", 2),
]


def write_pairs(path, pairs, folds, n):
    lines = [f"{folds}\t{n}" if folds else f"{n}"]
    for _, a, i, b, j in pairs:
        lines.append(f"{a}\t{i}\t{j}" if a == b else f"{a}\t{i}\t{b}\t{j}")
    path.write_text("\n".join(lines) + "\n")


def write_pairs36(path: Path) -> None:
    """One fold of 36 pairs over the fixture's 4 people: 9 matched and 9 mismatched each."""
    people = sorted(PEOPLE)
    matched = [(0, p, i, p, i + 1) for p in people for i in range(1, 10)]
    mismatched = [(0, p, i, people[(k + 1) % 4], i) for k, p in enumerate(people) for i in range(1, 10)]
    write_pairs(path, matched + mismatched, 1, 36)


def build_lfw(shared, root: Path) -> Path:
    """ROOT/Name/Name_NNNN.png: 4 people x 10 images from the shared folders."""
    for person, (folder, label) in PEOPLE.items():
        files = sorted(p for p in (shared / folder).iterdir() if p.name.endswith(f"_{label}{p.suffix}"))
        (root / person).mkdir(parents=True)
        for k, src in enumerate(files, 1):
            Image.open(src).convert("RGB").save(root / person / f"{person}_{k:04d}.png")
    write_pairs(root / "pairs.txt", PAIRS, 2, 3)
    return root


@pytest.fixture(scope="module")
def lfw_root(shared_imgs, tmp_path_factory):
    return build_lfw(shared_imgs, tmp_path_factory.mktemp("lfw"))


def test_builtins_are_registered_as_plugins():
    assert {"folder", "lfw", "identity-list", "verification-bin"} <= set(registry.available("datasets"))
    assert registry.get("datasets", "lfw").source == "iwmf_bench.datasets.lfw:LFW"


def test_lfw_gives_exactly_the_pairs_written(lfw_root):
    ds = open_dataset("lfw", root=str(lfw_root), ext="png")
    assert len(ds) == 40 and ds.folds == 2
    got = [(p.fold, *ds.names[p.a].split("/")[0:1], int(ds.names[p.a][-8:-4]),
            ds.names[p.b].split("/")[0], int(ds.names[p.b][-8:-4])) for p in ds.pairs()]
    assert got == PAIRS
    assert [p.same for p in ds.pairs()] == [a == b for _, a, _, b, _ in PAIRS]
    assert len(set(ds.labels)) == 4 and all(ds.labels.count(lab) == 10 for lab in set(ds.labels))
    # lazily read, and the pixels are the shared image's
    first = ds.read(ds.names.index("Ann_Lee/Ann_Lee_0001.png"))
    assert torch.equal(first, read_image(lfw_root / "Ann_Lee" / "Ann_Lee_0001.png"))


def test_lfw_dev_test_single_set(lfw_root, tmp_path):
    matched = [p for p in PAIRS if p[1] == p[3]][:2]
    mismatched = [p for p in PAIRS if p[1] != p[3]][:2]
    write_pairs(tmp_path / "pairsDevTest.txt", matched + mismatched, 0, 2)
    ds = open_dataset("lfw", root=str(lfw_root), pairs_file=str(tmp_path / "pairsDevTest.txt"), ext="png")
    assert [(p.same, p.fold) for p in ds.pairs()] == [(True, 0)] * 2 + [(False, 0)] * 2


@pytest.mark.parametrize("lines,message", [
    (["1\t2", "Ann_Lee\t1\t2", "Ann_Lee\t1\t99", "Ann_Lee\t1\tDee_Fox\t1", "Bob_Ray\t1\tCid_Moe\t1"],
     "Ann_Lee_0099.png does not exist"),
    (["1\t1", "Ann_Lee\t1\tDee_Fox\t1", "Bob_Ray\t1\tCid_Moe\t1"], "pairs.txt:2: malformed line"),
    (["1\t1", "Ann_Lee\t1\t2", "Bob_Ray\tx\tCid_Moe\t1"], "pairs.txt:3: malformed line"),
    (["two folds", "Ann_Lee\t1\t2"], "expected a header"),
    (["1\t2", "Ann_Lee\t1\t2"], "is it truncated"),
])
def test_bad_pairs_files_exit_2_with_one_line(lfw_root, tmp_path, capsys, lines, message):
    bad = tmp_path / "pairs.txt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        open_dataset("lfw", root=str(lfw_root), pairs_file=str(bad), ext="png")
    code = main(["calibrate", "--model", "dlib-resnet", "--dataset", "lfw", "--root", str(lfw_root),
                 "--pairs-file", str(bad), "-O", "ext=png"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message.split(":")[-1].strip() in err


def test_identity_list_labels_and_seeded_pairs(shared_imgs, tmp_path):
    lines = []
    for folder in ("source", "target"):
        for p in sorted((shared_imgs / folder).iterdir()):
            (tmp_path / "img").mkdir(exist_ok=True)
            name = f"{folder}_{p.name}"
            (tmp_path / "img" / name).write_bytes(p.read_bytes())
            lines.append(f"{name} {int(p.stem.split('_')[1]) + (100 if folder == 'target' else 0)}")
    (tmp_path / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    opts = dict(root=str(tmp_path / "img"), identity_file=str(tmp_path / "identity_CelebA.txt"), pairs=50)
    ds = open_dataset("identity-list", seed=3, **opts)
    assert ds.names == [ln.split()[0] for ln in lines]
    assert ds.labels == [int(ln.split()[1]) for ln in lines]
    pairs = ds.pairs()
    assert sum(p.same for p in pairs) == 50 and len(pairs) == 100
    assert all(p.same == (ds.labels[p.a] == ds.labels[p.b]) and p.a != p.b for p in pairs)
    assert len({(min(p.a, p.b), max(p.a, p.b)) for p in pairs}) == 100  # no repeats
    assert pairs == open_dataset("identity-list", seed=3, **opts).pairs()  # the seed fixes them
    assert pairs != open_dataset("identity-list", seed=4, **opts).pairs()
    (tmp_path / "identity_CelebA.txt").write_text("\n".join(lines + ["gone.jpg 7"]) + "\n")
    with pytest.raises(DatasetError, match="names 1 image.*missing.*gone.jpg"):
        open_dataset("identity-list", seed=3, **opts)
    (tmp_path / "identity_CelebA.txt").write_text("\n".join(lines + ["a b c"]) + "\n")
    with pytest.raises(DatasetError, match=r"identity_CelebA.txt:41: malformed line"):
        open_dataset("identity-list", seed=3, **opts)
    (tmp_path / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="cannot draw 500 genuine"):
        open_dataset("identity-list", **{**opts, "pairs": 500})


def encode(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_verification_bin_written_here(shared_imgs, tmp_path, protocol):
    src, tgt = sorted((shared_imgs / "source").iterdir()), sorted((shared_imgs / "target").iterdir())
    images, issame = [], []
    for k in range(20):  # pair k: source k with source k+1 (same person unless 9/10) or target k
        other = src[k + 1] if k % 2 == 0 and k + 1 < 20 else tgt[k]
        images += [encode(src[k]), encode(other)]
        issame.append(other in src and (k < 9) == (k + 1 < 10))
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=protocol))
    ds = open_dataset("verification-bin", path=str(path))
    assert len(ds) == 40 and [p.same for p in ds.pairs()] == issame
    assert [(p.a, p.b) for p in ds.pairs()] == [(2 * k, 2 * k + 1) for k in range(20)]
    assert [p.fold for p in ds.pairs()] == [k // 2 for k in range(20)]
    assert torch.equal(ds.read(0), read_image(src[0])) and torch.equal(ds.read(1), read_image(src[1]))
    assert torch.equal(ds.read(3), read_image(tgt[1]))
    # no identity labels: threat pairs come from the listed pairs
    from iwmf_bench.pipeline.dataset_pairs import threat_pairs

    tp = threat_pairs(ds, 3, 0)
    listed = {(p.a, p.b): p.same for p in ds.pairs()}
    assert len(tp["impersonation"]) == 3 and not any(listed[p] for p in tp["impersonation"])
    assert len(tp["genuine"]) == 3 and all(listed[p] for p in tp["genuine"])
    assert tp["attacker_refs"] == [None] * 3


def test_python2_style_pickle_reads_as_bytes():
    """Python 2 wrote these files with its str type: SHORT_BINSTRING, read back as bytes."""
    py2 = b"\x80\x02](U\x02abU\x02cde]\x88a\x86."
    assert safe_load(py2, "py2.bin") == ([b"ab", b"cd"], [True])


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/iwmf_pwned",))


@pytest.mark.parametrize("payload,message", [
    (lambda: pickle.dumps(([b"x", b"y"], [Exploit()]), protocol=2), "GLOBAL"),
    (lambda: pickle.dumps(([b"x", b"y"], [True]), protocol=2), "GLOBAL"),  # py3 bytes at protocol 2
    (lambda: pickle.dumps(([b"x", b"y"], [Exploit()]), protocol=4), r"STACK_GLOBAL \(posix.system\)"),
    (lambda: pickle.dumps(({"a": b"x"}, [True]), protocol=4), "EMPTY_DICT"),
    (lambda: pickle.dumps((["text", "x"], [True]), protocol=4), "SHORT_BINUNICODE"),
])
def test_crafted_pickle_is_refused_with_one_line(tmp_path, capsys, payload, message):
    path = tmp_path / "evil.bin"
    path.write_bytes(payload())
    with pytest.raises(DatasetError, match=f"refused: the pickle uses {message}"):
        safe_load(path.read_bytes(), str(path))
    code = main(["calibrate", "--model", "dlib-resnet", "--dataset", "verification-bin", "--path", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refused" in err
    assert not Path("/tmp/iwmf_pwned").exists()


def test_folder_dataset_keeps_the_paper_pairing(shared_imgs):
    ds = open_dataset("folder", sources=str(shared_imgs / "source"), targets=str(shared_imgs / "target"))
    assert len(ds) == 40 and ds.impersonation_pairs() == [(i, 20 + i) for i in range(20)]
    pairs = ds.pairs()
    assert len(pairs) == 780 and sum(p.same for p in pairs) == 4 * 45
    with pytest.raises(DatasetError, match="unknown option.*sauce"):
        open_dataset("folder", sauce="x", targets="y")


SUITE = """\
name: lfw-tiny
seed: 0
device: cpu
data: {{dataset: lfw, root: "{root}", pairs_file: "{pairs}", ext: png, pairs: 4}}
models:
  dlib-resnet: {{threshold: {{far: 0.1, dataset: lfw}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.25}}
threat_models:
  apgd-transfer: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.03, steps: 2}}
  apgd-adaptive: {{attack: apgd, setting: adaptive, norm: Linf, eps: 0.03, steps: 2, eot_iter: 1, grad_mode: exact}}
evaluation: {{draws: 2}}
"""


@pytest.mark.slow
def test_suite_on_lfw_with_calibrated_threshold_end_to_end(lfw_root, tmp_path, monkeypatch, capsys):
    """dlib-resnet, none and IWMF, APGD transfer and adaptive at tiny budgets, threshold
    calibrated to FAR 0.1 on 36 clean impostor pairs: leaderboards state it."""
    from iwmf_bench.suite import load_suite

    monkeypatch.setenv("IWMF_BENCH_CACHE", str(tmp_path / "cache"))
    write_pairs36(tmp_path / "pairs36.txt")
    cfg = tmp_path / "lfw.yaml"
    cfg.write_text(SUITE.format(root=lfw_root, pairs=tmp_path / "pairs36.txt"))
    cells = load_suite(cfg).cells()
    assert cells[0].model_options == {"threshold": {"far": 0.1, "dataset": "lfw"}}
    boards, imgs = tmp_path / "boards", tmp_path / "imgs"
    code = main(["run", "--config", str(cfg), "--all", "--results", str(tmp_path / "results"),
                 "--leaderboards", str(boards), "--imgs", str(imgs), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    cal = json.loads(next((tmp_path / "cache" / "calibration").glob("*.json")).read_text())
    assert cal["impostor_pairs"] == 36 and cal["far"]["k"] == 3  # floor(0.1 * 36)
    cell = json.loads((boards / "cells" / "dlib-resnet__iwmf__apgd-adaptive.json").read_text())["metrics"]
    assert cell["threshold"] == cal["threshold"] and cell["pairs"] == 4
    assert cell["threshold_source"]["far_target"] == 0.1
    # IWMF is random: the 4 genuine pairs' FRR counts both draws (its interval the 4 pairs)
    assert (cell["frr_genuine"]["n"], cell["frr_genuine"]["clusters"]) == (8, 4)
    assert cell["votes"]["genuine"]["draws"] == 2 and len(cell["votes"]["genuine"]["accepted"]) == 4
    assert cell["clean"]["genuine_pairs"] == 4 and "needs >= 100 impostor pairs" in cell["clean"]["tar_at_far"]["0.01"]["note"]
    md = (boards / "dlib-resnet.md").read_text()
    assert f"threshold {cal['threshold']:.6g} (euclidean, accept <=): calibrated to FAR 0.1 on 36 clean impostor pairs of lfw" in md
    assert "clean pairs (iwmf, 4 genuine / 4 impostor" in md and "clean pairs (none" in md
    assert (imgs / "lfw-tiny_roc_dlib-resnet.png").is_file()
    # threat pairs: attacker and victim of different identities, drawn with the seed
    from iwmf_bench.pipeline.dataset_pairs import threat_pairs

    ds = open_dataset("lfw", root=str(lfw_root), pairs_file=str(tmp_path / "pairs36.txt"), ext="png")
    tp = threat_pairs(ds, 4, 0)
    assert tp == threat_pairs(ds, 4, 0) and tp != threat_pairs(ds, 4, 1)
    assert all(ds.labels[a] != ds.labels[b] for a, b in tp["impersonation"])
    assert all(ds.labels[r] == ds.labels[a] and r != a for (a, _), r in zip(tp["impersonation"], tp["attacker_refs"]))
    assert all(p in [(q.a, q.b) for q in ds.pairs() if q.same] for p in tp["genuine"])


@pytest.mark.parametrize("data,threshold,message", [
    ('{dataset: lfw, root: R, bogus: 1}', "0.6", "unknown option.*bogus for dataset lfw"),
    ('{dataset: lfw, root: R, pairs: 0}', "0.6", "data.pairs must be a positive integer"),
    ('{dataset: lfw, root: R}', "{far: 2, dataset: lfw}", r"threshold.far must be in \(0, 1\)"),
    ('{dataset: lfw, root: R}', "{far: 0.01}", "must be a number or"),
    ('{dataset: lfw, root: R}', "{far: 0.01, dataset: identity-list}", "is not the suite's data.dataset"),
    ('{dataset: nope, root: R}', "0.6", "unknown dataset 'nope'"),
])
def test_bad_dataset_suites_fail_before_running(tmp_path, data, threshold, message):
    from iwmf_bench.errors import BenchError
    from iwmf_bench.suite import load_suite, validate

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"data: {data}\nmodels: {{dlib-resnet: {{threshold: {threshold}}}}}\n"
                   "defenses: {none: {}}\nthreat_models: {clean: {attack: null}}\n")
    with pytest.raises(BenchError, match=message):
        validate(load_suite(cfg))


ORTHOGONAL = """\
name: lfw-orthogonal
seed: 0
device: cpu
data: {{dataset: lfw, root: "{root}", pairs_file: "{pairs}", ext: png, pairs: 4}}
models: [dlib-resnet]
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.1}}
threat_models:
  clean-dodging: {{attack: null, goal: dodging}}
  apgd-dodging: {{attack: apgd, setting: transfer, goal: dodging, norm: Linf, eps: 0.03, steps: 5}}
  adaptive-dodging: {{attack: apgd, setting: adaptive, goal: dodging, norm: Linf, eps: 0.03, steps: 3,
                     eot_iter: 2, grad_mode: exact}}
  apgd-photo: {{attack: apgd, setting: transfer, surrogate: dlib-resnet, norm: Linf, eps: 0.03, steps: 5}}
evaluation: {{draws: 2}}
"""


@pytest.fixture(scope="module")
def orthogonal_run(lfw_root, tmp_path_factory):
    """Crafting methods the folder protocol had alone, on a dataset suite: dodging
    (transfer and adaptive) and cross-model transfer through the raw photos."""
    from iwmf_bench.runner import run_cells
    from iwmf_bench.suite import load_suite, validate

    tmp = tmp_path_factory.mktemp("orthogonal")
    write_pairs36(tmp / "pairs36.txt")
    cfg = tmp / "orthogonal.yaml"
    cfg.write_text(ORTHOGONAL.format(root=lfw_root, pairs=tmp / "pairs36.txt"))
    suite = load_suite(cfg)
    validate(suite)
    mp = pytest.MonkeyPatch()
    mp.setenv("IWMF_BENCH_CACHE", str(tmp / "cache"))
    try:
        records = run_cells(suite.cells(), tmp / "results", progress=False)
    finally:
        mp.undo()
    return suite, {(r["cell"]["defense"], r["cell"]["threat"]): r for r in records}, tmp


def test_dodging_on_a_dataset_suite(orthogonal_run):
    """Dodging perturbs the probe of each listed genuine pair so that it is rejected
    against its own identity's reference: clean, few are; after APGD, all are. The
    rate equals a straightforward re-scoring of the saved images within the budget."""
    from iwmf_bench import load_model
    from iwmf_bench.data import quantize
    from iwmf_bench.pipeline.dataset_pairs import DatasetPairs

    suite, by, tmp = orthogonal_run
    assert all(r["status"] == "ok" for r in by.values()), [r.get("reason") for r in by.values()]
    clean, attacked = by[("none", "clean-dodging")]["metrics"], by[("none", "apgd-dodging")]["metrics"]
    assert "far" not in attacked and attacked["goal"] == "dodging"
    assert clean["dodging_success"]["n"] == attacked["dodging_success"]["n"] == 4  # the genuine pairs
    assert clean["dodging_success"]["k"] <= 1 and attacked["dodging_success"]["k"] == 4
    assert by[("none", "adaptive-dodging")]["metrics"]["dodging_success"]["k"] >= 3
    # re-score the cached transfer images by hand
    cell = next(c for c in suite.cells() if c.defense == "none" and c.threat == "apgd-dodging")
    ident = cell.derived(defense="-", defense_options={}, evaluation={}).key
    adv = torch.load(tmp / "results" / suite.name / "adversarial" / f"{ident}.pt", weights_only=True)["adversarial"]
    pairs = DatasetPairs(cell.data, cell.seed).pairs("dlib-resnet", 150)
    assert (adv - pairs.genuine_a).abs().amax() <= 0.03 + 1e-6
    model = load_model("dlib-resnet")
    with torch.no_grad():
        d = (model.embed(quantize(adv)) - model.embed(pairs.genuine_b)).norm(dim=1)
    assert int((d > model.threshold).sum()) == attacked["dodging_success"]["k"]


def test_cross_model_transfer_on_a_dataset_suite(orthogonal_run, tmp_path):
    """``surrogate: MODEL`` on a dataset: the drawn attackers' raw photos are perturbed
    within the budget (on the photo) and scored through each model's own alignment."""
    from iwmf_bench.leaderboard import render

    suite, by, _ = orthogonal_run
    m = by[("none", "apgd-photo")]["metrics"]
    notes = m["attack"]["notes"]
    assert notes["surrogate"] == "dlib-resnet" and notes["photo_linf"] <= 0.03 + 1e-6
    assert m["per_pair"]["linf"] is None  # crafted on the photo: its budget is photo_linf
    assert m["pairs"] == 4 and m["far"]["k"] >= 3  # same model: the attack transfers to itself
    assert by[("iwmf", "apgd-photo")]["metrics"]["far_worst_of_n"]["n"] == 4
    render(suite, list(by.values()), tmp_path)
    md = (tmp_path / "dlib-resnet.md").read_text()
    assert "dodging apgd-dodging %" in md and "FAR apgd-photo %" in md
