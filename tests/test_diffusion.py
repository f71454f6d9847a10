"""Diffusion defenses: DDRM against an analytic oracle, the CelebA-HQ UNet layout,
end-to-end purification with a tiny UNet, exact gradients, missing weights."""

import hashlib
import math

import pytest
import torch

import iwmf_bench
from iwmf_bench import registry
from iwmf_bench.defenses import ddrm
from iwmf_bench.defenses.diffusion import DiffPure, IWMFDiff
from iwmf_bench.defenses.diffusion_prior import load_prior_config, load_unet
from iwmf_bench.defenses.diffusion_unet import DDPMUNet
from iwmf_bench.errors import BenchError, WeightsError
from iwmf_bench.weights import resolve

ABAR = ddrm.alphas_cumprod(ddrm.beta_schedule("linear", 1e-4, 0.02, 1000))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny workloads: see conftest


# --- DDRM with an analytic Gaussian oracle ----------------------------------------------

def gaussian_oracle(abar, mu, tau):
    """E[eps | x_t] for data x0 ~ N(mu, tau^2 I): the optimal noise predictor."""
    def eps_model(x_t, t):
        a = float(abar[int(t[0])])
        return math.sqrt(1 - a) * (x_t - math.sqrt(a) * mu) / (a * tau ** 2 + 1 - a)
    return eps_model


def ddrm_law(abar, timesteps, mu, tau, sigma_0, eta_a, eta_b):
    """Closed-form law of DDRM's output given y under the Gaussian oracle.

    Every DDRM update is affine in (x_mod, y, mu) plus independent Gaussian noise, and
    the oracle's x0_hat = k x_mod + (1 - k) mu with k = tau^2 / (tau^2 + sigma_t^2), so
    the output is ``A y + B mu + N(0, V)``. Derived here from the paper's equations
    (Kawar et al. 2022, eq. 7-8 with H = I), independently of the sampler's code.
    """
    seq = ddrm.skip_sequence(abar.numel(), timesteps)
    ab = [float(a) for a in abar]

    def sig(a):
        return math.sqrt(1 - a) / math.sqrt(a)

    s_T = sig(ab[seq[-1]])
    A, B, V = (1.0, 0.0, s_T ** 2 - sigma_0 ** 2) if s_T > sigma_0 else (0.0, 0.0, s_T ** 2)
    for t, t_next in zip(reversed(seq), reversed([-1] + seq[:-1])):
        s_t, s_n = sig(ab[t]), (sig(ab[t_next]) if t_next >= 0 else 0.0)
        k = tau ** 2 / (tau ** 2 + s_t ** 2)
        XA, XB, XV = k * A, k * B + (1 - k), k * k * V  # law of x0_hat
        if s_n > sigma_0:
            A, B, V = eta_b + (1 - eta_b) * XA, (1 - eta_b) * XB, (1 - eta_b) ** 2 * XV + s_n ** 2 - (eta_b * sigma_0) ** 2
        else:
            assert s_n < sigma_0  # the equality case is not hit by these settings
            c = math.sqrt(1 - eta_a ** 2) * s_n / sigma_0
            A, B, V = XA + c * (1 - XA), XB * (1 - c), (1 - c) ** 2 * XV + (eta_a * s_n) ** 2
    return A, B, V


# DDRM is *not* an exact posterior sampler, for any number of steps or eta: measured with
# mu=0.1, tau=0.5, sigma_0=0.3 (posterior slope 0.735, variance 0.0662), its output has
# slope 0.699 / variance 0.0217 at the defaults (20 steps, etaA=0.85), 0.606 / 0.0346
# with etaA=1, and with 1000 steps 0.894 / 0.0076 (etaA=0.85) or 0.000 / 0.122 (etaA=1:
# re-noising x0_hat at every step forgets y). Only its "before" phase (etaB=1) is exact.
# DDRM's reference code (efficient_generalized_steps, H = I), run once with this oracle,
# gives the same 0.699 / 0.0217 and 0.606 / 0.0346.
# So the sampler is tested against DDRM's own closed-form law, which pins every
# coefficient of the algorithm; the posterior is the reference for the oracle itself.
@pytest.mark.parametrize("timesteps,eta_a,eta_b", [(20, 0.85, 1.0), (50, 1.0, 1.0), (20, 0.5, 0.7)])
def test_ddrm_with_gaussian_oracle_matches_closed_form(timesteps, eta_a, eta_b):
    mu, tau, sigma_0 = 0.1, 0.5, 0.3
    g = torch.Generator().manual_seed(timesteps)
    shape = (8, 3, 128, 128)  # N = 393,216 independent pixels (the oracle is per pixel)
    x0 = mu + tau * torch.randn(shape, generator=g, dtype=torch.float64)
    y = x0 + sigma_0 * torch.randn(shape, generator=g, dtype=torch.float64)
    out = ddrm.ddrm_denoise(gaussian_oracle(ABAR, mu, tau), y, sigma_0, ABAR, timesteps, g,
                            eta_a=eta_a, eta_b=eta_b)
    A, B, V = ddrm_law(ABAR, timesteps, mu, tau, sigma_0, eta_a, eta_b)
    r, yy = (out - A * y - B * mu).flatten(), y.flatten()
    n, var_y = r.numel(), yy.var().item()
    # 5 standard errors: mean of r, regression slope of r on y, variance of r.
    assert abs(r.mean().item()) <= 5 * math.sqrt(V / n)
    slope = ((r - r.mean()) * (yy - yy.mean())).mean().item() / var_y
    assert abs(slope) <= 5 * math.sqrt(V / (n * var_y))
    assert abs(r.var().item() - V) <= 5 * V * math.sqrt(2 / n)
    # Unconditionally DDRM keeps the data mean: A + B = 1, as for the posterior mean.
    assert A + B == pytest.approx(1.0, abs=1e-12)


def test_gaussian_oracle_is_the_posterior_mean_of_eps():
    """The oracle itself: E[eps | x_t] by regression on simulated (x0, eps) pairs."""
    mu, tau, t = 0.1, 0.5, 300
    a = float(ABAR[t])
    g = torch.Generator().manual_seed(1)
    x0 = mu + tau * torch.randn(200_000, generator=g, dtype=torch.float64)
    eps = torch.randn(200_000, generator=g, dtype=torch.float64)
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    pred = gaussian_oracle(ABAR, mu, tau)(x_t, torch.tensor([t]))
    resid = eps - pred  # orthogonal to x_t and mean zero when pred is E[eps | x_t]
    se = resid.std().item() / math.sqrt(resid.numel())
    assert abs(resid.mean().item()) <= 5 * se
    assert abs((resid * (x_t - x_t.mean())).mean().item() / x_t.std().item()) <= 5 * se


def test_sigma_to_zero_returns_observation():
    mu, tau = 0.1, 0.5
    g = torch.Generator().manual_seed(2)
    y = mu + tau * torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    out = ddrm.ddrm_denoise(gaussian_oracle(ABAR, mu, tau), y, 1e-6, ABAR, 20, g)
    A, B, V = ddrm_law(ABAR, 20, mu, tau, 1e-6, 0.85, 1.0)
    # What is left is the last step's noise level sigma(t=0) = sqrt(beta_0/(1-beta_0)) = 0.01.
    assert A == pytest.approx(1.0, abs=1e-3) and math.sqrt(V) < 0.0101
    assert (out - y).pow(2).mean().sqrt().item() < 0.0101 * (1 + 5 * math.sqrt(2 / y.numel()))


class ZeroEps(torch.nn.Module):
    """A 'model' that predicts no noise: DDRM then returns y + sigma(0)-level noise."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.zeros_like(x)


def test_defense_with_tiny_sigma_returns_input():
    x = 0.1 + 0.8 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    d = DiffPure(sigma_y=1e-6, config="tiny", unet=ZeroEps(), timesteps=20)
    out = d.purify(x, torch.Generator().manual_seed(4))
    # Exactly: out = x + 0.5 * sqrt(sigma(0)^2 - sigma_0^2) z in [0,1] units.
    s = 0.5 * math.sqrt(float((1 - ABAR[0]) / ABAR[0]) - (2e-6) ** 2)
    rms = (out - x).pow(2).mean().sqrt().item()
    assert abs(rms - s) <= 5 * s * math.sqrt(2 / x.numel())


# --- the CelebA-HQ UNet -------------------------------------------------------------------

# sha256 of the sorted "key:shape" lines of DDRM's models/diffusion.py Model for
# configs/celeba_hq.yml, i.e. of the layout of celeba_hq.ckpt (450 tensors).
CELEBA_LAYOUT_SHA256 = "bb40d565b671f9f8cc4a7326010a64fc2922d054ca0389f58322a56841e2fc08"


def celeba_layout():
    with torch.device("meta"):
        unet = DDPMUNet(load_prior_config("celeba_hq").unet)
    return unet


def test_celeba_unet_parameter_count_and_layout():
    unet = celeba_layout()
    assert sum(p.numel() for p in unet.parameters()) == 113_673_219  # about 113.67M
    sd = unet.state_dict()
    lines = "\n".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in sorted(sd.items()))
    assert len(sd) == 450
    assert hashlib.sha256(lines.encode()).hexdigest() == CELEBA_LAYOUT_SHA256


def test_checkpoint_layout_loads_strictly(tmp_path):
    # Stride-0 expanded zeros: a checkpoint with the real names and shapes in a tiny file.
    shapes = {k: v.shape for k, v in celeba_layout().state_dict().items()}
    path = tmp_path / "celeba_hq.ckpt"
    torch.save({k: torch.zeros(()).expand(s) for k, s in shapes.items()}, path)
    unet = load_unet(load_prior_config("celeba_hq"), resolve("celeba-hq-ddpm", weights=path))
    assert {k: v.shape for k, v in unet.state_dict().items()} == shapes
    # The defense resolves the same file at construction and builds the UNet lazily.
    d = DiffPure(weights=path)
    assert d.unet is None

    broken = {k: torch.zeros(()).expand(s) for k, s in shapes.items() if "mid.attn_1" not in k}
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(WeightsError, match="does not match"):
        load_unet(load_prior_config("celeba_hq"), tmp_path / "broken.ckpt")


# --- end to end with the tiny UNet -------------------------------------------------------

@pytest.mark.parametrize("cls", [DiffPure, IWMFDiff])
def test_tiny_purification(cls):
    x = torch.rand(3, 3, 40, 36, generator=torch.Generator().manual_seed(5))  # resized to 32x32 and back
    d = cls(config="tiny", pretrained=False, timesteps=4, batch_size=2)
    out = d.purify(x, torch.Generator().manual_seed(6))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, d.purify(x, torch.Generator().manual_seed(6)))
    assert not torch.allclose(out, d.purify(x, torch.Generator().manual_seed(7)))
    # Internal chunking does not change the result (noise is drawn image by image).
    one = cls(config="tiny", pretrained=False, timesteps=4, batch_size=1)
    assert torch.allclose(out, one.purify(x, torch.Generator().manual_seed(6)), atol=1e-5)
    assert cls.registered_name in registry.available("defenses")


def test_functional_iwmfdiff_matches_the_defense_and_reuses_it():
    from iwmf_bench import iwmfdiff
    from iwmf_bench.defenses import diffusion

    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(4))
    options = {"config": "tiny", "pretrained": False, "timesteps": 3}
    ref = IWMFDiff(lambda_0=0.3, sigma_y=0.1, **options).purify(x, torch.Generator().manual_seed(5))
    out = iwmfdiff(x, 0.3, 0.1, generator=torch.Generator().manual_seed(5), **options)
    assert torch.equal(out, ref)
    hits = diffusion._shared_iwmfdiff.cache_info().hits
    again = iwmfdiff(x, 0.3, 0.1, generator=torch.Generator().manual_seed(5), **options)
    assert torch.equal(again, ref) and diffusion._shared_iwmfdiff.cache_info().hits == hits + 1


def test_purifiers_check_channels():
    # IWMF is per channel, so any channel count; the UNet takes its config's in_channels.
    gray = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    assert registry.create("defenses", "iwmf").purify(gray).shape == gray.shape
    with pytest.raises(BenchError, match=r"input to purify: expected 3 channels \(NCHW\), got shape \(1, 1, 12, 12\)"):
        IWMFDiff(config="tiny", pretrained=False).purify(gray)


@pytest.mark.parametrize("config", ["tiny", "tiny_adm"])  # the DDPM and the ADM architecture
def test_exact_gradient_matches_finite_differences(config):
    d = IWMFDiff(config=config, pretrained=False, timesteps=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    x = 0.25 + 0.5 * torch.rand(1, 3, 34, 34, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 3, 34, 34, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 3, 34, 34, generator=gen, dtype=torch.float64)

    def f(inp):  # fixed generator: windows and DDRM noise are the same for every call
        return (d.purify(inp, torch.Generator().manual_seed(9), grad_mode="exact") * w).sum()

    xr = x.clone().requires_grad_(True)
    f(xr).backward()
    autograd = (xr.grad * v).sum().item()
    h = 1e-6
    with torch.no_grad():
        fd = (f(x + h * v) - f(x - h * v)).item() / (2 * h)
    assert autograd != 0
    assert fd == pytest.approx(autograd, rel=1e-6)  # measured agreement: ~1e-9


def test_checkpointed_steps_give_the_same_gradient():
    unet = DiffPure(config="tiny", pretrained=False, timesteps=4)._build_unet()
    y0 = 2 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10)) - 1
    grads = []
    for ckpt in (False, True):
        y = y0.clone().requires_grad_(True)
        out = ddrm.ddrm_denoise(unet, y, 0.3, ABAR, 4, torch.Generator().manual_seed(11), checkpoint=ckpt)
        out.square().sum().backward()
        grads.append(y.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)



# The GPU options run on CPU too (autocast has a CPU bf16/fp16 path; inductor compiles for
# CPU), so everything but the device itself is checked here; test_cuda_* below is the rest.
@pytest.mark.parametrize("options,out_tol,grad_tol", [
    # Tolerances on the mean |difference| (output) and on it relative to the mean |gradient|;
    # measured: 1.4e-7/3.7e-7, 1.1e-3/1.2e-2, 1.4e-4/4.1e-3, 1.3e-7/3.5e-7.
    ({"channels_last": True}, 1e-6, 1e-5),
    ({"dtype": "bfloat16"}, 5e-3, 0.05),
    ({"dtype": "float16"}, 1e-3, 0.02),
    pytest.param({"compile": True, "channels_last": True}, 1e-6, 1e-5, marks=pytest.mark.slow),
], ids=["channels_last", "bf16", "fp16", "compile"])
def test_speed_options_keep_the_result_and_its_gradient(options, out_tol, grad_tol):
    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    results = []
    for kw in ({}, options):
        d = IWMFDiff(config="tiny", pretrained=False, timesteps=3, **kw)
        xr = x.clone().requires_grad_(True)
        out = d.purify(xr, torch.Generator().manual_seed(1), grad_mode="exact")
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
        results.append((out.detach(), xr.grad))
    (ref, ref_grad), (out, grad) = results
    assert (out - ref).abs().mean() < out_tol
    assert (grad - ref_grad).abs().mean() < grad_tol * ref_grad.abs().mean()


# --- weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: DiffPure(), lambda: IWMFDiff(),
                                  lambda: registry.create("defenses", "diffpure"),
                                  lambda: iwmf_bench.iwmfdiff(torch.rand(1, 3, 8, 8))])
def test_missing_checkpoint_fails_fast(tmp_path, monkeypatch, make):
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="iwmf-bench fetch celeba-hq-ddpm"):
        make()


def test_cli_reports_missing_checkpoint(tmp_path, monkeypatch, capsys):
    from iwmf_bench.cli import main

    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path))
    code = main(["purify", "--defense", "iwmfdiff", "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "iwmf-bench fetch celeba-hq-ddpm" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_purification_matches_cpu(dtype):
    # Same generator draws on CPU and CUDA (noise is drawn on the CPU), so fp32 results agree
    # to float rounding; reduced-precision autocast stays close.
    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    cpu = IWMFDiff(config="tiny", pretrained=False, timesteps=4)
    ref = cpu.purify(x, torch.Generator().manual_seed(1))
    gpu = IWMFDiff(config="tiny", pretrained=False, timesteps=4, dtype=dtype, channels_last=True).cuda()
    out = gpu.purify(x.cuda(), torch.Generator().manual_seed(1)).cpu()
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    tol = 1e-4 if dtype == "float32" else 0.05
    assert (out - ref).abs().mean() < tol
