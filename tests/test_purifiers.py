"""The baseline purifiers: bit-depth, median, random-resize-pad, gaussian-noise.

Forward passes against references written here (the integer bit-depth formula, scipy's
median filter, a per-pixel bilinear resize), exact gradients against finite differences,
the generator contract of the stochastic ones, their statistics, and bad options through
the Python API and the command line.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from iwmf_bench import registry
from iwmf_bench.data import load_folder
from iwmf_bench.defenses import median as median_module
from iwmf_bench.defenses.bit_depth import BitDepth
from iwmf_bench.defenses.gaussian_noise import GaussianNoise
from iwmf_bench.defenses.median import Median
from iwmf_bench.defenses.random_resize_pad import XIE_RATIO, RandomResizePad, draw_layouts
from iwmf_bench.errors import BenchError


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def all_bytes_image():
    """Every 8-bit value, a few times, in a 1x3x16x16 image (as float in [0,1])."""
    v = torch.arange(256, dtype=torch.int64).reshape(1, 1, 16, 16).repeat(1, 3, 1, 1)
    return v, v.float() / 255


# ---------------------------------------------------------------- bit-depth


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_depth_equals_the_integer_formula(bits):
    v, x = all_bytes_image()
    levels = 2 ** bits - 1
    q = (2 * v * levels + 255) // 510  # round(v * L / 255): never a tie, 255 is odd
    for dtype in (torch.float32, torch.float64):
        out = BitDepth(bits).purify(x.to(dtype))
        assert torch.equal(out, q.to(dtype) / levels)
    assert len(torch.unique(q)) == 2 ** bits  # every level is reached
    if bits == 8:
        assert torch.equal(BitDepth(8).purify(x), x)  # 8 bits keep 8-bit images


def test_bit_depth_offers_bpda_only():
    x = torch.rand(2, 3, 8, 8, generator=seeded(), requires_grad=True)
    out = BitDepth(3).purify(x, grad_mode="bpda")
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
    assert torch.equal(out, BitDepth(3).purify(x.detach()))
    with pytest.raises(BenchError, match="does not support grad_mode 'exact'"):
        BitDepth(3).purify(x, grad_mode="exact")


# ---------------------------------------------------------------- median


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("size", [(16, 16), (15, 15), (12, 9), (5, 4)])
def test_median_equals_scipy_reflect(k, size):
    x = torch.rand(2, 3, *size, generator=seeded(k * 100 + size[0] + size[1]))
    for dtype in (torch.float32, torch.float64):
        ref = scipy.ndimage.median_filter(x.to(dtype).numpy(), size=(1, 1, k, k), mode="reflect")
        assert np.array_equal(Median(k).purify(x.to(dtype)).numpy(), ref)


def test_median_chunks_and_real_images_with_ties(shared_imgs, monkeypatch):
    # The shared faces (8-bit, so many equal values in a window), batch 20x3x160x160, with
    # the window buffer forced into chunks of a few planes.
    x = load_folder(shared_imgs / "source").images
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="reflect")
    assert np.array_equal(Median(3).purify(x).numpy(), ref)
    monkeypatch.setattr(median_module, "_CHUNK_BYTES", 5 * 160 * 160 * 25 * 4)  # 5 planes
    small = x[:3]
    ref = scipy.ndimage.median_filter(small.numpy(), size=(1, 1, 5, 5), mode="reflect")
    assert np.array_equal(Median(5).purify(small).numpy(), ref)


def test_median_gradient_selects_one_pixel():
    x = torch.rand(1, 2, 6, 5, dtype=torch.float64, generator=seeded(2), requires_grad=True)
    fn = lambda t: Median(3).purify(t, grad_mode="exact")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    out = fn(x)
    # d out[0,1,2,3] / dx is one-hot, on a pixel of the same channel holding that value.
    (grad,) = torch.autograd.grad(out[0, 1, 2, 3], x)
    assert grad.sum() == 1 and (grad == 1).sum() == 1
    c, i, j = [int(a) for a in grad[0].nonzero()[0]]
    assert c == 1 and abs(i - 2) <= 1 and abs(j - 3) <= 1 and x[0, c, i, j] == out[0, 1, 2, 3]


# ---------------------------------------------------------------- random-resize-pad


def bilinear_reference(img, out_h, out_w):
    """Per-pixel bilinear resize with half-pixel centres (align_corners=False), numpy."""
    c, in_h, in_w = img.shape
    out = np.empty((c, out_h, out_w))

    def taps(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for i in range(out_h):
        r0, r1, wr = taps(i, in_h, out_h)
        for j in range(out_w):
            c0, c1, wc = taps(j, in_w, out_w)
            out[:, i, j] = ((1 - wr) * ((1 - wc) * img[:, r0, c0] + wc * img[:, r0, c1])
                            + wr * ((1 - wc) * img[:, r1, c0] + wc * img[:, r1, c1]))
    return out


def test_random_resize_pad_equals_reference_pipeline():
    x = torch.rand(3, 3, 20, 16, dtype=torch.float64, generator=seeded(1))
    defense = RandomResizePad(r_min=0.9, r_max=1.3, pad_value=0.25)
    out = defense.purify(x, seeded(5))
    (padded_h, padded_w), layouts = draw_layouts(3, 20, 16, 0.9, 1.3, seeded(5))
    assert (padded_h, padded_w) == (26, 21)
    for image, result, (n, m, top, left) in zip(x.numpy(), out.numpy(), layouts):
        canvas = np.full((3, padded_h, padded_w), 0.25)
        canvas[:, top:top + n, left:left + m] = bilinear_reference(image, n, m)
        np.testing.assert_allclose(result, bilinear_reference(canvas, 20, 16), atol=1e-12)
    # Degenerate range: no resize, no padding, the identity.
    assert torch.equal(RandomResizePad(1.0, 1.0).purify(x, seeded(0)), x)
    assert not RandomResizePad(1.0, 1.0).stochastic and defense.stochastic


def test_random_resize_pad_draws_cover_xies_range_uniformly():
    # 160x160 faces with Xie's ratio: sizes 160..176 (upper bound exclusive), padded to 177.
    (padded_h, padded_w), layouts = draw_layouts(3400, 160, 160, 1.0, XIE_RATIO, seeded(11))
    assert (padded_h, padded_w) == (177, 177)
    sizes = np.array([n for n, _, _, _ in layouts])
    assert all(n == m for n, m, _, _ in layouts)  # square stays square
    counts = np.bincount(sizes - 160, minlength=17)
    assert len(counts) == 17 and counts.min() > 0  # exactly the sizes 160..176, all of them
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum()
    assert chi2 < 39.25  # 99.9% quantile of chi-square with 16 degrees of freedom
    tops = np.array([t for _, _, t, _ in layouts])
    lefts = np.array([left for _, _, _, left in layouts])
    assert (tops >= 0).all() and (tops <= 177 - sizes).all() and (lefts <= 177 - sizes).all()
    smallest = sizes == 160  # offsets 0..17 inclusive: all 18 reached, both ends included
    assert set(tops[smallest]) == set(range(18)) and set(lefts[smallest]) == set(range(18))
    # Independent of each other given the size: correlate the offsets as fractions of their range.
    span = 177 - sizes + 1
    assert abs(np.corrcoef((tops + 0.5) / span, (lefts + 0.5) / span)[0, 1]) < 0.06


def test_random_resize_pad_gradcheck():
    x = torch.rand(2, 2, 9, 8, dtype=torch.float64, generator=seeded(3), requires_grad=True)
    defense = RandomResizePad(r_min=0.8, r_max=1.4)
    fn = lambda t: defense.purify(t, seeded(4), grad_mode="exact")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------- gaussian-noise


def test_gaussian_noise_statistics_on_mid_grey():
    x = torch.full((20, 3, 64, 64), 0.5)
    noise = GaussianNoise(0.1).purify(x, seeded(0)) - 0.5  # clamping needs a 5-sigma draw
    n = noise.numel()
    assert abs(noise.mean().item()) < 4 * 0.1 / n ** 0.5
    assert abs(noise.std().item() / 0.1 - 1) < 0.01
    flat = noise.reshape(20, -1)
    assert abs(np.corrcoef(flat[0].numpy(), flat[1].numpy())[0, 1]) < 0.02  # images differ
    # Clamped to [0, 1]: a big sigma saturates about half the pixels at each end.
    big = GaussianNoise(10.0).purify(x, seeded(0))
    assert big.min() == 0 and big.max() == 1 and 0.45 < (big == 1).float().mean() < 0.55


def test_gaussian_noise_gradcheck_and_zero_sigma():
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64, generator=seeded(6), requires_grad=True)
    fn = lambda t: GaussianNoise(0.3).purify(t, seeded(7), grad_mode="exact")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    clamped = (fn(x) == 0) | (fn(x) == 1)
    assert clamped.any() and torch.equal(grad, (~clamped).double())  # 0 exactly where clamped
    g = seeded(8)
    state = g.get_state()
    zero = GaussianNoise(0)
    assert not zero.stochastic and torch.equal(zero.purify(x.detach(), g), x.detach())
    assert torch.equal(g.get_state(), state)  # sigma 0 draws nothing


# ---------------------------------------------------------------- the generator contract

STOCHASTIC = [lambda: RandomResizePad(), lambda: RandomResizePad(r_min=0.8, r_max=1.25),
              lambda: GaussianNoise(0.1)]


@pytest.mark.parametrize("make", STOCHASTIC, ids=["rrp-xie", "rrp-wide", "noise"])
def test_stochastic_defenses_follow_the_generator(make):
    defense = make()
    assert defense.stochastic
    x = torch.rand(5, 3, 24, 20, generator=seeded(0))
    rng_before = torch.random.get_rng_state()
    a = defense.purify(x, seeded(1))
    b = defense.purify(x, seeded(1))
    c = defense.purify(x, seeded(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = seeded(1)
    chunked = torch.cat([defense.purify(x[:2], gen), defense.purify(x[2:3], gen), defense.purify(x[3:], gen)])
    assert torch.equal(chunked, a)  # the purify CLI and the harness chunk batches this way
    assert torch.equal(defense.purify(x[:1], seeded(1)), a[:1])  # image 0 ignores the batch size
    same = x[:1].expand(2, -1, -1, -1)
    assert not torch.equal(*defense.purify(same, seeded(3)))  # per-image draws
    d1, d2 = defense.purify(x), defense.purify(x)  # no generator: fresh entropy, still not global
    assert not torch.equal(d1, d2)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert 0 <= float(a.min()) and float(a.max()) <= 1 and a.shape == x.shape


def test_deterministic_defenses_leave_the_global_rng_alone():
    x = torch.rand(2, 3, 10, 10, generator=seeded(0), requires_grad=True)
    rng_before = torch.random.get_rng_state()
    for defense in (BitDepth(4), Median(3)):
        assert not defense.stochastic
        for mode in defense.grad_modes:
            defense.purify(x, None, grad_mode=mode)
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_registered_with_their_options():
    cases = {"bit-depth": ({"bits": 5}, {"bits": 5}),
             "median": ({"k": 5}, {"k": 5}),
             "random-resize-pad": ({"r_max": 1.2}, {"r_min": 1.0, "r_max": 1.2, "pad_value": 0.5}),
             "gaussian-noise": ({"sigma": 0.25}, {"sigma": 0.25})}
    for name, (kwargs, config) in cases.items():
        defense = registry.create("defenses", name, **kwargs)
        assert defense.name == name and defense.config() == config
        assert defense.purify(torch.full((1, 3, 8, 8), 0.5), seeded(0)).shape == (1, 3, 8, 8)


# ---------------------------------------------------------------- bad options

BAD_OPTIONS = [
    (BitDepth, {"bits": 0}, "bits must be an integer from 1 to 8"),
    (BitDepth, {"bits": 9}, "bits must be an integer from 1 to 8"),
    (BitDepth, {"bits": 4.5}, "bits must be an integer from 1 to 8"),
    (BitDepth, {"bits": "5"}, "bits must be an integer from 1 to 8"),
    (BitDepth, {"bits": True}, "bits must be an integer from 1 to 8"),
    (BitDepth, {"bits": float("nan")}, "bits must be an integer from 1 to 8"),
    (Median, {"k": 4}, "window k must be an odd positive integer"),
    (Median, {"k": 0}, "window k must be an odd positive integer"),
    (Median, {"k": -3}, "window k must be an odd positive integer"),
    (Median, {"k": 2.5}, "window k must be an odd positive integer"),
    (Median, {"k": float("inf")}, "window k must be an odd positive integer"),
    (GaussianNoise, {"sigma": -0.1}, "sigma must be a finite number >= 0"),
    (GaussianNoise, {"sigma": float("nan")}, "sigma must be a finite number >= 0"),
    (GaussianNoise, {"sigma": float("inf")}, "sigma must be a finite number >= 0"),
    (RandomResizePad, {"r_min": 1.2, "r_max": 1.1}, r"r_min \(1.2\) must not exceed r_max \(1.1\)"),
    (RandomResizePad, {"r_min": 0}, "r_min must be > 0"),
    (RandomResizePad, {"r_min": -1.0}, "r_min must be > 0"),
    (RandomResizePad, {"r_max": "big"}, "r_max must be a finite number"),
    (RandomResizePad, {"r_max": float("nan")}, "r_max must be a finite number"),
    (RandomResizePad, {"pad_value": 2}, r"pad_value must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_OPTIONS)
def test_bad_options_raise_bench_error(cls, kwargs, message):
    with pytest.raises(BenchError, match=message):
        cls(**kwargs)


def test_tiny_r_min_is_a_clear_error_at_run_time():
    with pytest.raises(BenchError, match="raise r_min"):
        RandomResizePad(r_min=0.01, r_max=1.0).purify(torch.rand(1, 3, 8, 8, generator=seeded()), seeded())


def cli(*args):
    exe = Path(sys.executable).with_name("iwmf-bench")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("defense,options,message", [
    ("median", ["k=4"], "window k must be an odd positive integer"),
    ("bit-depth", ["bits=9"], "bits must be an integer from 1 to 8"),
    ("gaussian-noise", ["sigma=-0.1"], "sigma must be a finite number >= 0"),
    ("random-resize-pad", ["r_min=1.2", "r_max=1.1"], "r_min (1.2) must not exceed r_max (1.1)"),
])
def test_cli_bad_option_is_one_line_exit_2(shared_imgs, tmp_path, defense, options, message):
    extra = [a for o in options for a in ("-D", o)]
    r = cli("purify", "--defense", defense, *extra, "--input", shared_imgs / "source", "--output", tmp_path / "o")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert lines[0].startswith("iwmf-bench: error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_cli_median_and_bit_depth_are_exact_on_the_shared_images(shared_imgs, tmp_path):
    # The saved 8-bit PNGs equal scipy's median of the 8-bit input, and the integer
    # bit-depth formula mapped back to 8 bits (round(q * 255 / L), never a tie).
    src = shared_imgs / "source"
    names = sorted(p.name for p in src.iterdir())
    v = np.stack([np.asarray(Image.open(src / n).convert("RGB")) for n in names]).astype(np.int64)  # NHWC
    r = cli("purify", "--defense", "median", "-D", "k=5", "--input", src, "--output", tmp_path / "median")
    assert r.returncode == 0, r.stderr
    expected = scipy.ndimage.median_filter(v, size=(1, 5, 5, 1), mode="reflect")
    got = np.stack([np.asarray(Image.open(tmp_path / "median" / Path(n).with_suffix(".png").name)) for n in names])
    assert np.array_equal(got, expected) and not np.array_equal(got, v)
    r = cli("purify", "--defense", "bit-depth", "-D", "bits=3", "--input", src, "--output", tmp_path / "bits")
    assert r.returncode == 0, r.stderr
    q = (2 * v * 7 + 255) // 510
    expected = (2 * q * 255 + 7) // 14
    got = np.stack([np.asarray(Image.open(tmp_path / "bits" / Path(n).with_suffix(".png").name)) for n in names])
    assert np.array_equal(got, expected) and len(np.unique(got)) == 8


def test_median3_network_equals_the_index_path_with_ties():
    from iwmf_bench.defenses.median import median3_values, median_filter

    g = torch.Generator().manual_seed(11)
    for shape in [(2, 3, 16, 16), (1, 3, 15, 9), (3, 2, 5, 4)]:
        x = (torch.rand(shape, generator=g) * 8).round() / 8  # few levels: many ties
        with_indices = median_filter(x.clone().requires_grad_(True), 3).detach()  # the autograd path
        assert torch.equal(median3_values(x), with_indices)
