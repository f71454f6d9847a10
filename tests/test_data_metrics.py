"""Image folder protocol and verification metrics."""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from iwmf_bench.data import load_folder, quantize, save_images
from iwmf_bench.errors import DataError
from iwmf_bench.metrics import (Rate, accepts, far_frr, impersonation_far, margin, matched_frr,
                                pair_scores, roc_auc, scores, wilson_interval)


def test_loads_shared_folder_in_id_order(shared_imgs):
    src = load_folder(shared_imgs / "source")
    assert src.images.shape == (20, 3, 160, 160) and src.images.dtype == torch.float32
    assert src.ids == list(range(20)) and src.labels == [25] * 10 + [26] * 10
    assert 0.0 <= src.images.min() and src.images.max() <= 1.0
    small = load_folder(shared_imgs / "target", size=112)
    assert small.images.shape == (20, 3, 112, 112) and small.labels == [0] * 10 + [1] * 10


def test_modes_converted_and_png_roundtrip_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((8, 8), 255, np.uint8)])
    Image.fromarray(rgb).save(tmp_path / "00002_1.png")
    Image.fromarray(gray).save(tmp_path / "00001_0.bmp")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "00000_3.png")
    data = load_folder(tmp_path)
    assert data.ids == [0, 1, 2] and data.labels == [3, 0, 1]
    assert torch.equal(data.images[1, 0], data.images[1, 2])  # gray -> 3 equal channels
    assert np.array_equal((data.images[0] * 255).round().byte().permute(1, 2, 0).numpy(), rgb)
    out = tmp_path / "out"
    save_images(data.images, data.names, out)
    assert sorted(p.name for p in out.iterdir()) == ["00000_3.png", "00001_0.png", "00002_1.png"]
    again = load_folder(out)
    assert torch.equal(again.images, quantize(data.images))


@pytest.mark.parametrize("case,message", [
    ("corrupt", "unreadable or corrupt image"),
    ("misnamed", "does not match NNNNN_label.ext"),
    ("duplicate", "duplicate id"),
    ("empty", "no images"),
    ("mixed_sizes", "differs from"),
])
def test_bad_folders_name_the_file_and_problem(tmp_path, case, message):
    ok = np.zeros((6, 6, 3), np.uint8)
    if case != "empty":
        Image.fromarray(ok).save(tmp_path / "00000_1.png")
    if case == "corrupt":
        good = tmp_path / "tmp.jpg"
        Image.fromarray(ok).save(good)
        (tmp_path / "00001_1.jpg").write_bytes(good.read_bytes()[:40])
        good.unlink()
    elif case == "misnamed":
        Image.fromarray(ok).save(tmp_path / "face_1.png")
    elif case == "duplicate":
        Image.fromarray(ok).save(tmp_path / "00000_2.jpg")
    elif case == "mixed_sizes":
        Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "00001_1.png")
    with pytest.raises(DataError, match=message) as err:
        load_folder(tmp_path)
    assert "\n" not in str(err.value)
    if case in ("corrupt", "misnamed"):
        assert ("00001_1.jpg" if case == "corrupt" else "face_1.png") in str(err.value)


def test_wilson_interval_known_values():
    # Reference values computed by hand from the closed form (z = 1.96).
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    r = Rate(3, 4)
    assert r.value == 0.75 and r.to_dict()["ci95"] == list(wilson_interval(3, 4))


def test_scores_far_frr_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    cos = pair_scores(a, b, "cosine")
    assert torch.allclose(cos, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2)] * 2]))
    dist = pair_scores(a, b, "euclidean")
    assert torch.allclose(dist, torch.tensor([[1.0, math.sqrt(10)], [math.sqrt(5), 2.0],
                                              [math.sqrt(2), math.sqrt(5)]]))
    # labels: a = [0, 1, 0], b = [0, 1]; genuine pairs (0,0), (1,1), (2,0); impostors the rest.
    r = far_frr(cos, [0, 1, 0], [0, 1], threshold=0.8, metric="cosine")
    assert (r["far"].k, r["far"].n, r["frr"].k, r["frr"].n) == (0, 3, 1, 3)  # (2,0) at 0.707 rejected
    r = far_frr(dist, [0, 1, 0], [0, 1], threshold=2.0, metric="euclidean")
    # accepted: (0,0) 1.0, (1,1) 2.0, (2,0) 1.41 -> no FRR; impostors (0,1) 3.16 (1,0) 2.24 (2,1) 2.24 -> FAR 0
    assert (r["far"].k, r["frr"].k) == (0, 0)
    r = far_frr(dist, [0, 1, 0], [0, 1], threshold=2.3, metric="euclidean")
    assert (r["far"].k, r["far"].n) == (2, 3)
    same = far_frr(pair_scores(a, a, "cosine"), [0, 1, 0], [0, 1, 0], 0.8, "cosine", exclude_self=True)
    assert (same["frr"].k, same["frr"].n, same["far"].n) == (1, 1, 2)


def test_margin_sign_and_index_matched_rates():
    s = torch.tensor([0.5, 0.7])
    assert torch.equal(accepts(s, 0.6, "cosine"), margin(s, 0.6, "cosine") > 0)
    assert torch.equal(accepts(s, 0.6, "euclidean"), margin(s, 0.6, "euclidean") > 0)
    adv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    tgt = torch.tensor([[1.0, 0.05], [1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(scores(adv, tgt, "euclidean"), torch.tensor([0.05, math.sqrt(2), math.sqrt(1.81)]))
    assert impersonation_far(adv, tgt, 0.6, "euclidean") == Rate(1, 3)
    assert matched_frr(adv, tgt, 0.6, "euclidean") == Rate(2, 3)
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2]), "euclidean") == pytest.approx(0.875)


def test_clustered_rate_interval_counts_clusters_not_draws():
    # 20 images x 10 draws, 50 accepted: the interval is that of 25% over 20 trials.
    clustered, naive = Rate(50, 200, clusters=20), Rate(50, 200)
    assert clustered.value == naive.value == 0.25
    assert clustered.interval == wilson_interval(5.0, 20)
    lo, hi = clustered.interval
    assert lo == pytest.approx(0.1119, abs=1e-4) and hi == pytest.approx(0.4687, abs=1e-4)
    assert hi - lo > naive.interval[1] - naive.interval[0]
    assert clustered.to_dict()["clusters"] == 20 and clustered.to_dict()["ci95"] == [lo, hi]


def test_far_frr_can_skip_only_the_diagonal():
    # Row i and column i are two versions of one image: pairs (i, j), i != j, both orders.
    s = torch.tensor([[0.9, 0.7, 0.1], [0.5, 0.9, 0.2], [0.1, 0.3, 0.9]])
    r = far_frr(s, [0, 0, 1], [0, 0, 1], threshold=0.6, metric="cosine", exclude_diagonal=True)
    # genuine off-diagonal: (0,1) 0.7 accepted, (1,0) 0.5 rejected; impostors (0,2) (1,2) (2,0) (2,1) rejected
    assert (r["frr"].k, r["frr"].n, r["far"].k, r["far"].n) == (1, 2, 0, 4)


def png_claiming_size(path, width, height):
    """A tiny, well-formed PNG whose header claims ``width x height`` (8-bit RGB): Pillow
    opens it as that size (the pixel data is never reached), so a decompression-bomb
    size costs 66 bytes on disk, not hundreds of megabytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20000, 10000])  # over twice Pillow's limit (its error); over it (its warning)
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, side):
    with monkeypatch.context() as m:  # with the check off, Pillow opens the header as that size
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(png_claiming_size(tmp_path / "probe.png", side, side)) as im:
            assert im.size == (side, side)
    (tmp_path / "probe.png").unlink()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "00000_1.png")
    png_claiming_size(tmp_path / "00001_1.png", side, side)
    with pytest.raises(DataError) as err:
        load_folder(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "00001_1.png" in message
    assert f"{side * side} pixels" in message and "too large" in message and "downscale" in message
