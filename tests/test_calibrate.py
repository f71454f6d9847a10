"""Clean-pair verification metrics against direct computations, and `iwmf-bench
calibrate` on the shared images (aligned, dlib-resnet) with its disk caches."""

import json
import math

import pytest
import torch

from iwmf_bench import roc
from iwmf_bench.cli import main
from iwmf_bench.errors import BenchError
from iwmf_bench.metrics import accepts, pair_scores


def direct(genuine, impostor, t, metric):
    ok = (lambda s: s >= t) if metric == "cosine" else (lambda s: s <= t)
    return sum(ok(s) for s in genuine.tolist()) / len(genuine), sum(ok(s) for s in impostor.tolist()) / len(impostor)


def direct_auc(genuine, impostor, metric):
    sign = 1 if metric == "cosine" else -1
    total = 0.0
    for g in genuine.tolist():
        for i in impostor.tolist():
            total += 1.0 if sign * g > sign * i else 0.5 if g == i else 0.0
    return total / (len(genuine) * len(impostor))


@pytest.mark.parametrize("metric,ties", [("cosine", False), ("euclidean", False), ("cosine", True)])
def test_metrics_match_direct_computation_on_a_score_matrix(metric, ties):
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(60, 8, generator=gen)
    labels = [i // 4 for i in range(60)]  # 15 identities x 4 images
    emb += 1.5 * torch.randn(15, 8, generator=gen).repeat_interleave(4, 0)
    s = pair_scores(emb, emb, metric).double()
    if ties:
        s = (s * 4).round() / 4  # coarse scores: many ties
    iu = torch.triu_indices(60, 60, 1)
    same = torch.tensor([labels[a] == labels[b] for a, b in iu.T.tolist()])
    flat = s[iu[0], iu[1]]
    genuine, impostor = flat[same], flat[~same]
    assert len(genuine) == 90 and len(impostor) == 1680
    for far in (1e-2, 1e-3, 0.1):
        t = roc.threshold_at_far(impostor, far, metric)
        tar, achieved = direct(genuine, impostor, t, metric)
        k = math.floor(far * len(impostor))
        assert round(achieved * len(impostor)) <= k  # never above the target
        if not ties:
            assert round(achieved * len(impostor)) == k  # exactly floor(far * n) without ties
        r = roc.rates_at(genuine, impostor, t, metric)
        assert r["tar"].value == pytest.approx(tar) and r["far"].value == pytest.approx(achieved)
        res = roc.tar_at_far(genuine, impostor, far, metric)
        assert res["supported"] and res["tar"]["value"] == pytest.approx(tar)
    assert roc.tar_at_far(genuine, impostor, 1e-4, metric) == {
        "far_target": 1e-4, "supported": False, "note": "needs >= 10000 impostor pairs, have 1680"}
    assert roc.auc(genuine, impostor, metric) == pytest.approx(direct_auc(genuine, impostor, metric), abs=1e-12)
    # EER: over every score as threshold, where |FAR - FRR| is smallest
    best = min((abs(f - (1 - t)), (f + 1 - t) / 2) for t, f in
               (direct(genuine, impostor, c, metric) for c in torch.unique(flat).tolist()))
    assert roc.eer(genuine, impostor, metric)[0] == pytest.approx(best[1])
    far_curve, tar_curve, _ = roc.roc_curve(genuine, impostor, metric)
    assert far_curve[-1] == 1 and tar_curve[-1] == 1 and bool((far_curve.diff() >= 0).all())


def test_bootstrap_interval_is_seeded_and_brackets_the_threshold():
    gen = torch.Generator().manual_seed(0)
    impostor = torch.randn(5000, generator=gen)
    t = roc.threshold_at_far(impostor, 1e-2, "cosine")
    a = roc.bootstrap_threshold(impostor, 1e-2, "cosine", torch.Generator().manual_seed(1))
    b = roc.bootstrap_threshold(impostor, 1e-2, "cosine", torch.Generator().manual_seed(1))
    assert a == b and a[0] < t < a[1]
    assert 2.0 < a[0] and a[1] < 2.7  # N(0,1) 99th percentile 2.326
    d = roc.bootstrap_threshold(impostor.abs() + 1, 1e-2, "euclidean", torch.Generator().manual_seed(1))
    assert d[0] < roc.threshold_at_far(impostor.abs() + 1, 1e-2, "euclidean") < d[1]


@pytest.mark.parametrize("far,message", [(1.5, r"FAR must be in \(0, 1\)"), (0.0, r"FAR must be in \(0, 1\)"),
                                         (1e-4, "below 1/600")])
def test_bad_far_exits_2(shared_imgs, far, message, capsys):
    with pytest.raises(BenchError, match=message):
        roc.check_far(far, 600)
    code = main(["calibrate", "--model", "dlib-resnet", "--dataset", "folder", "--sources",
                 str(shared_imgs / "source"), "--targets", str(shared_imgs / "target"), "--far", str(far)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "FAR" in err


@pytest.mark.slow
def test_calibrate_on_shared_images_hits_the_far(shared_imgs, tmp_path, monkeypatch, capsys):
    from iwmf_bench.align import align_images
    from iwmf_bench.data import load_folder
    from iwmf_bench.models.dlib_resnet import DlibResNet

    monkeypatch.setenv("IWMF_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--model", "dlib-resnet", "--dataset", "folder", "--sources", str(shared_imgs / "source"),
            "--targets", str(shared_imgs / "target"), "--far", "0.01", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["impostor_pairs"] == 600 and rec["genuine_pairs"] == 180 and rec["far"]["k"] == 6
    assert f"TAR {100 * rec['tar']['value']:.2f}%" in printed
    lo, hi = rec["threshold_ci95"]
    assert lo <= rec["threshold"] <= hi
    # Independently: float alignment (no cache), all 780 pairs, the returned threshold
    model = DlibResNet().eval()
    imgs = torch.cat([load_folder(shared_imgs / f).images for f in ("source", "target")])
    labels = load_folder(shared_imgs / "source").labels + load_folder(shared_imgs / "target").labels
    with torch.no_grad():
        emb = model.embed(align_images(imgs, "dlib-resnet")[0])
    s = pair_scores(emb, emb, "euclidean")
    acc = accepts(s, rec["threshold"], "euclidean")
    iu = torch.triu_indices(40, 40, 1)
    impostor = torch.tensor([labels[a] != labels[b] for a, b in iu.T.tolist()])
    accepted = int(acc[iu[0], iu[1]][impostor].sum())
    assert abs(accepted - 6) <= 1  # FAR 0.01 of 600 pairs, within one pair
    # The alignment is cached (one chunk, atomically written) and reused
    chunks = list((tmp_path / "cache" / "aligned").glob("folder-dlib-resnet-*/chunk_*.pt"))
    assert len(chunks) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
    stamp = chunks[0].stat().st_mtime_ns
    cached = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(cached) == 1
    cached[0].unlink()  # force a recalibration: the aligned chunk is read back, not recomputed
    assert main(argv[:-2]) == 0
    assert chunks[0].stat().st_mtime_ns == stamp
    assert json.loads(next((tmp_path / "cache" / "calibration").glob("*.json")).read_text())["threshold"] == rec["threshold"]
