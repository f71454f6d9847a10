"""FaceNet / InsightFace wrappers and the checkpoint registry (CPU, no network)."""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points

import pytest
import torch

from iwmf_bench import weights
from iwmf_bench.errors import WeightsError
from iwmf_bench.models.facenet import FaceNet
from iwmf_bench.models.insightface import CHECKPOINT as IF_CKPT
from iwmf_bench.models.insightface import InsightFace, iresnet100

# 3/13/30/3 IBasicBlocks + stem + BN-FC(25088 -> 512)-BN, counted from the architecture
# (arcface_torch's iresnet100 gives the same count, 65.16M; the fc alone is 12,845,568).
IRESNET100_PARAMS = 65_156_160
IRESNET100_FC_PARAMS = 512 * 7 * 7 * 512 + 512


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _patch_ckpt(monkeypatch, name, **changes):
    monkeypatch.setitem(weights.CHECKPOINTS, name, dataclasses.replace(weights.CHECKPOINTS[name], **changes))


@pytest.fixture(scope="module")
def insightface_random():
    torch.manual_seed(0)
    return InsightFace(pretrained=False)


@pytest.fixture(scope="module")
def facenet_random():
    torch.manual_seed(1)
    return FaceNet(pretrained=False)


@pytest.mark.parametrize("which,size", [("facenet_random", 160), ("insightface_random", 112)])
def test_random_init_forward_and_input_gradients(request, which, size):
    model = request.getfixturevalue(which)
    assert model.input_size == size and model.metric == "cosine" and 0 < model.threshold < 1
    assert not model.training
    x = torch.rand(2, 3, size, size, requires_grad=True)
    emb = model(x)
    assert emb.shape == (2, 512)
    assert torch.isfinite(emb).all()
    emb.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # embed() resizes other sizes to the model's own.
    assert model.embed(torch.rand(1, 3, 100, 100)).shape == (1, 512)


def test_facenet_embeddings_are_unit_norm_and_normalized_inside(facenet_random):
    model = facenet_random
    emb = model(torch.rand(2, 3, 160, 160))
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    # forward applies (x*255 - 127.5)/128 itself.
    x = torch.rand(1, 3, 160, 160)
    assert torch.allclose(model(x), model.net((x * 255 - 127.5) / 128), atol=1e-6)


def test_iresnet100_parameter_count(insightface_random):
    net = insightface_random.net
    assert sum(p.numel() for p in net.parameters()) == IRESNET100_PARAMS
    assert sum(p.numel() for p in net.fc.parameters()) == IRESNET100_FC_PARAMS == 12_845_568
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 13, 30, 3]


def test_iresnet100_state_dict_keys_match_arcface_torch():
    keys = list(iresnet100().state_dict())
    assert len(keys) == 925
    for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
                "layer3.29.conv2.weight", "layer4.2.bn3.bias", "bn2.weight", "fc.weight",
                "fc.bias", "features.weight", "features.running_var"):
        assert key in keys
    assert "layer1.1.downsample.0.weight" not in keys


def test_entry_points_name_these_classes():
    eps = {ep.name: ep for ep in entry_points(group="iwmf_bench.models")}
    assert eps["facenet"].load() is FaceNet
    assert eps["insightface"].load() is InsightFace


def test_missing_weights_name_the_fetch_command(home):
    with pytest.raises(WeightsError, match="iwmf-bench fetch facenet-vggface2"):
        FaceNet()
    with pytest.raises(WeightsError, match="iwmf-bench fetch facenet-casia-webface"):
        FaceNet(dataset="casia-webface")
    with pytest.raises(WeightsError, match=f"iwmf-bench fetch {IF_CKPT}"):
        InsightFace()


def test_facenet_state_dict_loads_strictly_through_resolve(tmp_path, home, facenet_random):
    src = facenet_random
    state = dict(src.net.state_dict())
    # Published files carry the training classifier; it is dropped, the rest is strict.
    state["logits.weight"] = torch.randn(8631, 512)
    state["logits.bias"] = torch.randn(8631)
    path = tmp_path / "facenet.pt"
    torch.save(state, path)
    assert weights.resolve("facenet-vggface2", weights=path) == path
    model = FaceNet(weights=path)
    x = torch.rand(2, 3, 160, 160)
    assert torch.equal(model(x), src(x))

    del state["last_bn.running_mean"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match="not a facenet-pytorch"):
        FaceNet(weights=path)


def test_insightface_state_dict_loads_strictly_through_resolve(tmp_path, home, monkeypatch, insightface_random):
    state = insightface_random.net.state_dict()
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    # The registered entry pins the mirror's sha256, so an arbitrary file is refused ...
    assert weights.CHECKPOINTS[IF_CKPT].sha256 is not None
    with pytest.raises(WeightsError, match="sha256"):
        weights.resolve(IF_CKPT, weights=path)
    # ... and accepted when its hash is the pinned one.
    _patch_ckpt(monkeypatch, IF_CKPT, sha256=weights.sha256_of(path))
    model = InsightFace(weights=path)  # resolve() checks the hash, then a strict load
    x = torch.rand(1, 3, 112, 112)
    assert torch.equal(model(x), insightface_random(x))

    torch.save({k: v for k, v in state.items() if k.startswith("layer1.")}, path)  # keys missing
    _patch_ckpt(monkeypatch, IF_CKPT, sha256=weights.sha256_of(path))
    with pytest.raises(WeightsError, match="not an arcface_torch"):
        InsightFace(weights=path)


def test_cached_file_not_matching_pin_is_refused(home, facenet_random):
    name = "facenet-vggface2"
    state = facenet_random.net.state_dict()
    path = weights.cache_path(name)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    pin = path.with_name(path.name + ".sha256")
    pin.write_text("0" * 64 + f"  {path.name}\n")
    with pytest.raises(WeightsError, match="does not match"):
        weights.resolve(name)
    with pytest.raises(WeightsError, match="does not match"):
        FaceNet()
    pin.write_text(f"{weights.sha256_of(path)}  {path.name}\n")
    assert weights.resolve(name) == path
    FaceNet()  # loads from the cache


def test_offline_fetch_fails_cleanly(home, monkeypatch):
    name = "facenet-vggface2"
    _patch_ckpt(monkeypatch, name, urls=("http://127.0.0.1:9/x",))
    with pytest.raises(WeightsError, match="could not download"):
        weights.fetch(name, progress=False, timeout=5)
    folder = weights.cache_path(name).parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_corrupt_checkpoint_is_refused(tmp_path, home):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightsError, match="cannot be loaded"):
        weights.load_state_dict(path)
    with pytest.raises(WeightsError, match="cannot be loaded"):
        FaceNet(weights=path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        FaceNet(pretrained=False, dataset="lfw")


def test_model_names_are_aliases_of_their_default_checkpoints():
    from iwmf_bench import weights as W

    assert W.get_checkpoint("facenet").name == "facenet-vggface2"
    assert W.get_checkpoint("diffpure") is W.get_checkpoint("iwmfdiff") is W.get_checkpoint("celeba-hq-ddpm")
    assert W.cache_path("facenet") == W.cache_path("facenet-vggface2")
    with pytest.raises(W.WeightsError, match="unknown checkpoint 'nope'"):
        W.get_checkpoint("nope")


def _project_imports(module_file):
    """(module-level?, imported project module, names) for each relative import of a file."""
    import ast

    tree = ast.parse(module_file.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((id(node) in top, node.module or "", [a.name for a in node.names]))
    return out


def test_weights_registry_and_npm_fetcher_are_layered():
    # weights (registry) -> npm_weights (fetcher) -> weights_cache (cache folder, hashing):
    # no module imports one above it, none at function level, none a private name.
    from pathlib import Path

    import iwmf_bench

    root = Path(iwmf_bench.__file__).parent
    below = {"weights_cache": {"errors"}, "npm_weights": {"errors", "weights_cache"},
             "weights": {"errors", "npm_weights", "weights_cache"}}
    for name, allowed in below.items():
        for module_level, module, names in _project_imports(root / f"{name}.py"):
            assert module_level, f"{name}.py imports .{module} inside a function"
            assert module in allowed, f"{name}.py imports .{module} (allowed: {sorted(allowed)})"
            assert not [n for n in names if n.startswith("_")], f"{name}.py imports private {names} from .{module}"


def test_cache_helpers_are_one_implementation(home):
    from iwmf_bench import npm_weights, weights_cache
    from iwmf_bench.models.faceres import CHECKPOINT  # registers the npm-packaged entry

    assert weights.home is weights_cache.home and weights.sha256_of is weights_cache.sha256_of
    assert weights.home() == home
    faceres = weights.get_checkpoint(CHECKPOINT)
    assert npm_weights.cache_dir(faceres) == weights.cache_path(CHECKPOINT).parent == home / "weights" / "faceres"
