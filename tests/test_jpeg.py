"""The jpeg defense: the real codec byte for byte, libjpeg's quantization tables, the
differentiable JPEG's gap to the codec and its gradients, and bad options."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iwmf_bench import registry
from iwmf_bench.defenses.jpeg import CHROMINANCE_TABLE, JPEG, LUMINANCE_TABLE, quantization_table, smooth_round
from iwmf_bench.errors import BenchError
from iwmf_bench.suite import load_suite, validate

EXE = str(Path(sys.executable).with_name("iwmf-bench"))


def pillow_jpeg(pixels: np.ndarray, quality: int, **options) -> np.ndarray:
    """The reference: Pillow's encode (its defaults) and decode of one uint8 HWC image."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, **options)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def faces(shared_imgs):
    """The 40 shared faces as uint8 NHWC, read with Pillow alone."""
    paths = sorted((shared_imgs / "source").iterdir()) + sorted((shared_imgs / "target").iterdir())
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert pixels.shape == (40, 160, 160, 3)
    return pixels


def as_batch(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("quality", [10, 50, 75, 95])
def test_forward_is_pillows_codec_byte_for_byte(faces, quality):
    out = JPEG(quality=quality).purify(as_batch(faces))
    got = (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)  # whole 8-bit values
    for pixels, mine in zip(faces, got):
        assert np.array_equal(mine, pillow_jpeg(pixels, quality))
    # The output is 4:2:0, Pillow's default: 4:4:4 would give other bytes.
    assert not np.array_equal(got[0], pillow_jpeg(faces[0], quality, subsampling="4:4:4"))


def test_forward_rounds_to_8_bits_first_and_bpda_passes_gradients_unchanged(faces):
    x = as_batch(faces[:4])
    jpeg = JPEG(quality=30)
    offset = torch.full_like(x, 0.4 / 255) * torch.where(x > 0.5, -1, 1)  # stays nearest to x
    assert torch.equal(jpeg.purify(x + offset), jpeg.purify(x))
    z = x.clone().requires_grad_()
    out = jpeg.purify(z, grad_mode="bpda")
    assert torch.allclose(out.detach(), jpeg.purify(x), atol=1e-6)  # x + (codec - x): float rounding
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    assert torch.equal(z.grad, weights)
    assert JPEG.stochastic is False and JPEG.grad_modes == ("none", "bpda", "exact")


@pytest.mark.parametrize("quality", [1, 10, 25, 50, 51, 75, 90, 95])
def test_quantization_tables_are_the_ones_libjpeg_writes(quality):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=quality)
    written = Image.open(io.BytesIO(buf.getvalue())).quantization  # the file's DQT, natural order
    assert quantization_table(LUMINANCE_TABLE, quality).flatten().tolist() == list(written[0])
    assert quantization_table(CHROMINANCE_TABLE, quality).flatten().tolist() == list(written[1])


def test_smooth_round_is_continuous_and_close_to_round():
    x = torch.linspace(-3, 3, 600_001, dtype=torch.float64)
    y = smooth_round(x)
    assert (y.diff() > -1e-12).all() and y.diff().abs().max() < 1e-3  # monotone, no jump at n + 1/2
    half = torch.tensor([-1.5, -0.5, 0.5, 2.5], dtype=torch.float64)
    assert torch.allclose(smooth_round(half), half)
    near = (x - x.round()).abs() < 0.4
    assert (y - x.round())[near].abs().max() < 0.4 ** 3 + 1e-3  # Shin & Song's d**3 plus < 0.001
    # The slope is continuous across the half-integers (left and right limits agree).
    h = torch.tensor([0.5 - 1e-9, 0.5 + 1e-9], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(smooth_round(h).sum(), h)
    assert torch.allclose(g, torch.tensor([24.0, 24.0], dtype=torch.float64), atol=1e-5)


# Mean absolute gap of the differentiable JPEG to the codec on the 40 shared faces, in
# 1/255 (measured: 1.835, 0.891, 1.423, 0.548, 0.587). The gap is largest at quality 10,
# where the quantization steps are widest, and around quality 50, where the faces (once
# JPEG-compressed at fine steps) have many coefficients near a rounding boundary that
# the codec's integer DCT and our real-valued one decide differently.
GAP_BOUNDS = {10: 2.0, 30: 1.0, 50: 1.6, 75: 0.65, 90: 0.7}


@pytest.mark.slow
def test_differentiable_jpeg_stays_within_the_stated_gap_of_the_codec(faces):
    x = as_batch(faces)
    for quality, bound in GAP_BOUNDS.items():
        jpeg = JPEG(quality=quality)
        gap = (jpeg.purify(x, grad_mode="exact") - jpeg.purify(x)).abs().mean().item() * 255
        assert gap < bound, (quality, gap)
        assert gap > 0.3  # an approximation: real numbers where the codec has integers


@pytest.mark.parametrize("size", [(157, 143), (37, 19), (4, 20), (20, 4), (1, 1)])
def test_differentiable_jpeg_handles_sizes_that_are_not_whole_mcus(faces, size):
    # libjpeg replicates edge pixels to fill the last 16x16 MCU and upsamples chroma
    # from its true size (box replication when it is at most 2 samples wide).
    h, w = size
    x = as_batch(faces[:6, :h, :w])
    jpeg = JPEG(quality=50)
    exact = jpeg.purify(x, grad_mode="exact")
    assert exact.shape == x.shape and 0 <= exact.min() and exact.max() <= 1
    assert (exact - jpeg.purify(x)).abs().mean() * 255 < 1.6


@pytest.mark.slow
def test_exact_gradient_passes_a_finite_difference_check(one_thread):
    g = torch.Generator().manual_seed(0)
    # Every Jacobian entry, in float64, on one whole 16x16 MCU and on a partial one
    # (edge padding, cropping, chroma upsampling at the edge) at coarse steps; values
    # kept off the 0/255 clamps.
    for quality, size in ((50, (16, 16)), (10, (9, 11))):
        jpeg = JPEG(quality=quality)
        x = (0.2 + 0.6 * torch.rand(1, 3, *size, generator=g, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(lambda v: jpeg.purify(v, grad_mode="exact"), (x,))


@pytest.mark.parametrize("quality", [0, 96, 200, -5, 50.0, 7.5, "50", True, None])
def test_bad_quality_is_a_bench_error_naming_the_range(quality):
    with pytest.raises(BenchError, match="quality must be an integer from 1 to 95"):
        JPEG(quality=quality)


def test_cli_bad_quality_exits_2_with_one_line_and_good_quality_writes_the_codec(faces, shared_imgs, tmp_path):
    args = [EXE, "purify", "--defense", "jpeg", "--input", str(shared_imgs / "source")]
    r = subprocess.run([*args, "-D", "quality=200", "--output", str(tmp_path / "bad")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("iwmf-bench: error:") and "1 to 95" in lines[0]
    assert "Traceback" not in r.stderr
    r = subprocess.run([*args, "-D", "quality=40", "--output", str(tmp_path / "ok")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    written = np.asarray(Image.open(tmp_path / "ok" / "00000_25.png").convert("RGB"))
    assert np.array_equal(written, pillow_jpeg(faces[0], 40))


def test_suite_accepts_jpeg_with_quality(shared_imgs, tmp_path):
    text = f"""\
name: jpeg-suite
data: {{sources: "{shared_imgs / 'source'}", targets: "{shared_imgs / 'target'}"}}
models: {{dlib-resnet: {{}}}}
defenses:
  jpeg-50: {{defense: jpeg, quality: 50}}
threat_models:
  clean: {{attack: null}}
"""
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    suite = load_suite(path)
    validate(suite)
    options = {k: v for k, v in suite.defenses["jpeg-50"].items() if k != "defense"}
    assert registry.create("defenses", "jpeg", **options).config() == {"quality": 50}
    path.write_text(text.replace("quality: 50", "qualty: 50"))
    with pytest.raises(BenchError, match="qualty"):
        validate(load_suite(path))
