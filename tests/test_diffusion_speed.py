"""The diffusion defenses' fast paths against fp32 eager on CPU: attention through SDPA,
GroupNorm under autocast, bf16 / channels_last / torch.compile, the compile and CUDA-graph
fallbacks, the exact-gradient memory policy. Tests marked ``gpu`` check the CUDA-only
parts (CUDA graphs, the free-memory rule) on a GPU machine.

Tolerances were measured on this project's CPU (torch 2.14.1) with the tiny priors and are
stated next to each test; the thresholds leave about 2-5x room.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from iwmf_bench.defenses import adm_unet, ddrm, ddrm_purifier, diffusion_runtime, diffusion_unet
from iwmf_bench.defenses.diffusion import DiffPure, IWMFDiff
from iwmf_bench.defenses.diffusion_prior import build_unet, load_prior_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny workloads: see conftest


def images(n=2, seed=0, dtype=torch.float32):
    return torch.rand(n, 3, 40, 36, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def purify_with_grad(defense, x, seed=1):
    """Output and exact-mode gradient of a fixed linear functional of it."""
    xr = x.clone().requires_grad_(True)
    out = defense.purify(xr, torch.Generator().manual_seed(seed), grad_mode="exact")
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    return out.detach(), xr.grad


# --- attention: SDPA equals the explicit softmax it replaced -------------------------------

def ddpm_attention_reference(block, x):
    """DDPM's single-head attention written out: softmax(q^T k / sqrt(C)) over positions."""
    b, c, hgt, wid = x.shape
    h = F.group_norm(x, 32, block.norm.weight, block.norm.bias, block.norm.eps)
    q, k, v = (conv(h).reshape(b, c, hgt * wid) for conv in (block.q, block.k, block.v))
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(c), dim=2)  # (B, query, key)
    out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hgt, wid)
    return x + block.proj_out(out)


def adm_attention_reference(block, x):
    """ADM's multi-head attention written out (qkv channels per head ordered q, k, v)."""
    b, c, *spatial = x.shape
    flat = x.reshape(b, c, -1)
    d = c // block.heads
    qkv = block.qkv(F.group_norm(flat, 32, block.norm.weight, block.norm.bias, block.norm.eps))
    q, k, v = qkv.reshape(b * block.heads, 3 * d, -1).split(d, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (flat + block.proj_out(out)).reshape(b, c, *spatial)


@pytest.mark.parametrize("kind", ["ddpm", "adm"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sdpa_attention_equals_explicit_softmax(kind, channels_last):
    # Max |difference| relative to max |output| (outputs of magnitude ~30 here), measured:
    # float32 3.1e-7 / 1.6e-6 (ddpm / adm, NCHW), 3.3e-7 / 7.1e-7 (channels-last);
    # float64 below 1.8e-15.
    torch.manual_seed(0)
    if kind == "ddpm":
        block, reference = diffusion_unet.AttnBlock(64), ddpm_attention_reference
    else:
        block, reference = adm_unet.Attention(64, heads=4), adm_attention_reference
    for p in block.parameters():  # non-trivial norm affine parameters
        p.data.normal_(0, 0.5)
    x = torch.randn(2, 64, 8, 8)
    ref = reference(block, x)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
        scale = ref.abs().max()
        assert (out - ref).abs().max() < 5e-6 * scale
        block64, x64 = block.double(), x.double()
        ref64 = reference(block64, x64)
        assert (block64(x64) - ref64).abs().max() < 1e-13 * scale


def test_attention_tokens_have_a_contiguous_channel_dimension():
    # What CUDA's fused SDPA kernels require (their check is on the last dimension's stride).
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    x = torch.randn(1, 64, 8, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion_unet.F, "scaled_dot_product_attention", spy)
        diffusion_unet.AttnBlock(64)(x)
        adm_unet.Attention(64, heads=4)(x)
    assert seen == [(1, 1, 1), (1, 1, 1)]


# --- GroupNorm under autocast ---------------------------------------------------------------

def test_group_norm_runs_in_the_autocast_dtype():
    torch.manual_seed(1)
    norm = diffusion_unet.group_norm(64)
    norm.weight.data.normal_(1, 0.3)
    norm.bias.data.normal_(0, 0.3)
    x = 3 + 2 * torch.randn(2, 64, 8, 8)  # an offset mean: statistics must not lose it
    ref = F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), ref)  # no autocast: torch's GroupNorm itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16
    # bf16 rounding of the input, the affine parameters and the output (2^-8 relative):
    # measured max |difference| 0.031 on values of magnitude ~3 (a bf16 step there is 0.016).
    assert (low.float() - ref).abs().max() < 0.1
    assert (low.float() - ref).abs().mean() < 0.01  # measured 4.3e-3


# --- speed options against fp32 eager --------------------------------------------------------

# Mean |output difference| and mean |gradient difference| relative to the mean |gradient|,
# IWMF-Diff with 3 DDRM steps on 2 images, against fp32 eager (autocast bf16 on CPU runs the
# same GroupNorm and attention code as CUDA). Measured (max |output difference| in brackets):
#   tiny:     bf16 1.1e-3 (0.016) / 1.1e-2, bf16 channels_last 1.1e-3 (0.013) / 1.1e-2,
#             channels_last 1.6e-7 (1.9e-6) / 4.2e-7, fp16 1.3e-4 (1.6e-3) / 3.7e-3
#   tiny_adm: bf16 1.3e-3 (0.016) / 1.9e-2, channels_last 1.7e-7 (2e-6) / 6e-7,
#             fp16 1.7e-4 (1.9e-3) / 6.2e-3
# (bf16 is emulated on a CPU without AVX512-BF16: ~10x slower than fp32, hence few cases.)
BF16 = {"dtype": "bfloat16"}


@pytest.mark.parametrize("config,options,out_tol,grad_tol", [
    ("tiny", BF16, 4e-3, 0.04),
    ("tiny", {**BF16, "channels_last": True}, 4e-3, 0.04),
    ("tiny", {"channels_last": True}, 1e-6, 1e-5),
    ("tiny_adm", BF16, 4e-3, 0.06),
    ("tiny_adm", {"channels_last": True}, 1e-6, 1e-5),
], ids=["tiny-bf16", "tiny-bf16-channels_last", "tiny-channels_last", "adm-bf16", "adm-channels_last"])
def test_fast_paths_against_fp32_eager(config, options, out_tol, grad_tol):
    x = images()
    ref, ref_grad = purify_with_grad(IWMFDiff(config=config, pretrained=False, timesteps=3), x)
    out, grad = purify_with_grad(IWMFDiff(config=config, pretrained=False, timesteps=3, **options), x)
    assert out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert (out - ref).abs().mean() < out_tol
    assert (grad - ref_grad).abs().mean() < grad_tol * ref_grad.abs().mean()


@pytest.mark.slow
def test_cuda_default_configuration_on_cpu_against_fp32_eager():
    """bf16 autocast + SDPA + torch.compile, the CUDA default less CUDA graphs, compiled
    for the CPU: within the bf16 tolerance of fp32 eager (measured 1.1e-3 / 1.1e-2, as
    bf16 eager)."""
    x = images()
    ref, ref_grad = purify_with_grad(IWMFDiff(config="tiny", pretrained=False, timesteps=3), x)
    fast = IWMFDiff(config="tiny", pretrained=False, timesteps=3, dtype="bfloat16", compile=True)
    out, grad = purify_with_grad(fast, x)
    assert not fast._eps_fn.failed  # it did compile
    assert (out - ref).abs().mean() < 4e-3
    assert (grad - ref_grad).abs().mean() < 0.04 * ref_grad.abs().mean()


def test_device_defaults():
    d = IWMFDiff(config="tiny", pretrained=False)
    assert d.speed_options("cpu") == {"dtype": "float32", "attention": "sdpa", "channels_last": False,
                                      "compile": False, "cuda_graphs": False, "draws_in_one_run": False,
                                      "checkpoint_steps": "auto"}
    assert d.speed_options("cuda") == {"dtype": "bfloat16 autocast", "attention": "sdpa", "channels_last": False,
                                       "compile": True, "cuda_graphs": True, "draws_in_one_run": True,
                                       "checkpoint_steps": "auto"}
    off = IWMFDiff(config="tiny", pretrained=False, dtype="fp32", compile="false", cuda_graphs=False,
                   checkpoint_steps=True, draws_in_one_run="off")
    assert off.speed_options("cuda") == {"dtype": "float32", "attention": "sdpa", "channels_last": False,
                                         "compile": False, "cuda_graphs": False, "draws_in_one_run": False,
                                         "checkpoint_steps": True}
    with pytest.raises(ddrm_purifier.BenchError, match="cuda_graphs must be true, false or auto"):
        IWMFDiff(config="tiny", pretrained=False, cuda_graphs="sometimes")


# --- fallbacks: one line, then eager -----------------------------------------------------------

def fallback_lines(caplog):
    return [r for r in caplog.records if r.name == ddrm_purifier.__name__ and r.levelno == logging.WARNING]


def test_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nsecond line of a long report")
        return run

    monkeypatch.setattr(ddrm_purifier.torch, "compile", broken_compile)
    x = images()
    ref = IWMFDiff(config="tiny", pretrained=False, timesteps=3).purify(x, torch.Generator().manual_seed(1))
    d = IWMFDiff(config="tiny", pretrained=False, timesteps=3, compile=True)
    with caplog.at_level(logging.WARNING, logger=ddrm_purifier.__name__):
        assert torch.equal(d.purify(x, torch.Generator().manual_seed(1)), ref)
        assert torch.equal(d.purify(x, torch.Generator().manual_seed(1)), ref)
    lines = fallback_lines(caplog)
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    assert "torch.compile failed (RuntimeError: no C++ compiler found); running the UNet eagerly" in lines[0].getMessage()


def test_compile_fallback_lets_real_errors_through(monkeypatch):
    monkeypatch.setattr(ddrm_purifier.torch, "compile", lambda module, **kw: module)
    calls = []
    fn = diffusion_runtime.CompiledWithFallback(lambda x: x[5], calls.append)
    with pytest.raises(IndexError):  # the eager module fails the same way: not a compile failure
        fn(torch.zeros(2))
    assert calls == [] and not fn.failed


def test_cuda_graphs_on_cpu_fall_back_with_one_line(caplog):
    x = images()
    ref = IWMFDiff(config="tiny", pretrained=False, timesteps=3).purify(x, torch.Generator().manual_seed(1))
    d = IWMFDiff(config="tiny", pretrained=False, timesteps=3, cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger=ddrm_purifier.__name__):
        assert torch.equal(d.purify(x, torch.Generator().manual_seed(1)), ref)
        assert torch.equal(d.purify(x, torch.Generator().manual_seed(1)), ref)
        IWMFDiff(config="tiny", pretrained=False, timesteps=3).purify(x)  # auto on CPU: silent
    lines = fallback_lines(caplog)
    assert len(lines) == 1
    assert "CUDA graphs need a CUDA device (images on cpu); running the DDRM steps eagerly" in lines[0].getMessage()


class EagerGraph:
    """Stands in for CudaGraphRun on the CPU: same constructor and call, runs eagerly;
    checks the plumbing around the graph (noise drawn outside, one graph per shape)."""

    built = []

    def __init__(self, run, y, noise, warm_up, pool=None):
        warm_up(y.clone())
        self.run = run
        EagerGraph.built.append(tuple(y.shape))

    def __call__(self, y, noise):
        return self.run(y.clone(), noise.clone())


def test_graph_path_plumbing_on_cpu(monkeypatch):
    monkeypatch.setattr(ddrm_purifier, "CudaGraphRun", EagerGraph)
    monkeypatch.setattr(ddrm_purifier.torch.cuda, "graph_pool_handle", lambda: None)
    EagerGraph.built = []
    x = images(3)
    ref = IWMFDiff(config="tiny", pretrained=False, timesteps=3, batch_size=2).purify(x, torch.Generator().manual_seed(1))
    d = IWMFDiff(config="tiny", pretrained=False, timesteps=3, batch_size=2)
    monkeypatch.setattr(d, "_graphs_on", lambda kind, warn=True: True)
    for _ in range(2):  # first call builds one graph per chunk shape, the second reuses them
        assert torch.equal(d.purify(x, torch.Generator().manual_seed(1)), ref)
    assert EagerGraph.built == [(2, 3, 32, 32), (1, 3, 32, 32)]


def test_graph_capture_failure_falls_back_with_one_line(monkeypatch, caplog):
    def failing(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ddrm_purifier, "CudaGraphRun", failing)
    monkeypatch.setattr(ddrm_purifier.torch.cuda, "graph_pool_handle", lambda: None)
    x = images(2)
    ref = IWMFDiff(config="tiny", pretrained=False, timesteps=3).purify(x, torch.Generator().manual_seed(1))
    d = IWMFDiff(config="tiny", pretrained=False, timesteps=3)
    monkeypatch.setattr(d, "_graphs_on", lambda kind, warn=True: not d._graphs_failed)
    with caplog.at_level(logging.WARNING, logger=ddrm_purifier.__name__):
        for _ in range(2):
            assert torch.equal(d.purify(x, torch.Generator().manual_seed(1)), ref)
    lines = fallback_lines(caplog)
    assert len(lines) == 1 and "CUDA graph capture failed (RuntimeError: operation not permitted" in lines[0].getMessage()


def test_noise_drawn_outside_the_step_loop_gives_the_same_run():
    """What the CUDA graph relies on: ddrm_denoise(noise=draw_noise(...)) takes exactly the
    generator's draws ddrm_denoise(generator) takes."""
    unet = DiffPure(config="tiny", pretrained=False)._build_unet()
    abar = load_prior_config("tiny").alphas_cumprod()
    y = 2 * images(3, seed=2)[..., :32, :32] - 1
    with torch.no_grad():
        ref = ddrm.ddrm_denoise(unet, y, 0.3, abar, 4, torch.Generator().manual_seed(3))
        noise = ddrm.draw_noise(3, ddrm.noise_draws(1000, 4), tuple(y.shape[1:]), torch.Generator().manual_seed(3), "cpu")
        assert torch.equal(ddrm.ddrm_denoise(unet, y, 0.3, abar, 4, None, noise=noise), ref)
    with pytest.raises(ddrm_purifier.BenchError, match="noise must have shape"):
        ddrm.ddrm_denoise(unet, y, 0.3, abar, 4, None, noise=noise[1:])


# --- exact-gradient memory policy ---------------------------------------------------------------

@pytest.mark.parametrize("config", ["tiny", "tiny_adm"])
def test_memory_policies_give_equal_gradients(config, monkeypatch):
    """keep, checkpoint and mixed (some steps kept) in float64: the same output and
    gradient (measured: bitwise equal, keep against checkpoint, on CPU; asserted to float64
    rounding)."""
    x = images(2, seed=4, dtype=torch.float64)
    results = {}
    for name, kw in (("checkpoint", {"checkpoint_steps": True}), ("keep", {"checkpoint_steps": False}),
                     ("mixed", {})):
        d = IWMFDiff(config=config, pretrained=False, timesteps=4, dtype=torch.float64, batch_size=1, **kw)
        if name == "mixed":  # "auto" with room for 3 steps: keeps 2 of each chunk's 4 (1 for backward)
            step = d._measure_step_bytes(d._eps_model(x.device), torch.zeros(1, 3, 32, 32, dtype=torch.float64))
            monkeypatch.setattr(d, "_free_memory", lambda device, free=math.ceil(3 * step / 0.9): free)
        results[name] = purify_with_grad(d, x)
        assert d.last_memory_policy == name
        assert d.last_memory_info["kept_steps"] == {"checkpoint": 0, "keep": 8, "mixed": 4}[name]
        assert d.last_memory_info["steps"] == 8  # 4 steps x 2 chunks of 1 image
    (ref, ref_grad) = results["keep"]
    for name in ("checkpoint", "mixed"):
        out, grad = results[name]
        assert torch.allclose(out, ref, rtol=0, atol=1e-13)
        assert torch.allclose(grad, ref_grad, rtol=1e-11, atol=1e-13)


def test_auto_policy_on_cpu_checkpoints_and_forward_only_records_none():
    d = DiffPure(config="tiny", pretrained=False, timesteps=2)
    x = images()
    d.purify(x.requires_grad_(True), torch.Generator().manual_seed(1), grad_mode="exact")
    assert d.last_memory_policy == "checkpoint" and d.last_memory_info["free_bytes"] is None
    d.purify(x.detach(), torch.Generator().manual_seed(1))
    assert d.last_memory_policy is None


def test_auto_policy_keeps_what_fits(monkeypatch):
    d = DiffPure(config="tiny", pretrained=False, timesteps=5)
    eps, chunk = d._eps_model(torch.device("cpu")), torch.zeros(2, 3, 32, 32)
    step = d._measure_step_bytes(eps, chunk)
    assert step > 0 and d._measure_step_bytes(eps, chunk) == step  # measured once per shape
    for free, keep in ((0, 0), (step, 0), (math.ceil(3 * step / 0.9), 2), (100 * step, 5)):
        monkeypatch.setattr(d, "_free_memory", lambda device, free=free: free)
        assert d._steps_to_keep(eps, chunk) == keep


# --- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"dtype": "float32", "compile": False}, {}], ids=["fp32-eager", "default"])
def test_cuda_graphs_equal_the_eager_loop(options):
    x = images(3).cuda()
    eager = IWMFDiff(config="tiny", pretrained=False, timesteps=4, batch_size=2, cuda_graphs=False, **options).cuda()
    graphs = IWMFDiff(config="tiny", pretrained=False, timesteps=4, batch_size=2, **options).cuda()
    for seed in (1, 2):  # capture (first call), then replay
        ref = eager.purify(x, torch.Generator().manual_seed(seed))
        out = graphs.purify(x, torch.Generator().manual_seed(seed))
        assert not graphs._graphs_failed and len(graphs._graphs) == 2  # chunks of 2 and 1
        tol = 1e-6 if options else 2e-3  # bf16: kernels may differ between capture and eager
        assert (out - ref).abs().max() < tol


@pytest.mark.gpu
def test_cuda_auto_memory_policy_keeps_steps_and_matches_checkpointing():
    x = images(2, dtype=torch.float32).cuda()
    kw = {"config": "tiny", "pretrained": False, "timesteps": 4, "dtype": "float32", "compile": False}
    auto = IWMFDiff(**kw).cuda()
    ckpt = IWMFDiff(checkpoint_steps=True, **kw).cuda()
    out, grad = purify_with_grad(auto, x)
    ref, ref_grad = purify_with_grad(ckpt, x)
    assert auto.last_memory_policy == "keep" and auto.last_memory_info["step_bytes"] > 0  # tiny fits
    assert ckpt.last_memory_policy == "checkpoint"
    assert (out - ref).abs().max() < 1e-6
    assert (grad - ref_grad).abs().max() < 1e-5 * grad.abs().max()


@pytest.mark.gpu
def test_cuda_default_is_bf16_compiled_and_graphed():
    d = IWMFDiff(config="tiny", pretrained=False, timesteps=4).cuda()
    assert d.speed_options() == {"dtype": "bfloat16 autocast", "attention": "sdpa", "channels_last": False,
                                 "compile": True, "cuda_graphs": True, "draws_in_one_run": True,
                                 "checkpoint_steps": "auto"}
    x = images(2).cuda()
    ref = IWMFDiff(config="tiny", pretrained=False, timesteps=4, dtype="float32", compile=False,
                   cuda_graphs=False).cuda().purify(x, torch.Generator().manual_seed(1))
    out = d.purify(x, torch.Generator().manual_seed(1))
    assert (out - ref).abs().mean() < 4e-3  # the CPU bf16 tolerance


def test_build_unet_still_uses_the_checkpoint_layout():
    # The GroupNorm subclass keeps nn.GroupNorm's state-dict keys (checkpoints load strictly).
    with torch.device("meta"):
        unet = build_unet(load_prior_config("tiny").unet)
    assert all(isinstance(m, torch.nn.GroupNorm) for m in unet.modules() if "norm" in type(m).__name__.lower())
    assert "down.0.block.0.norm1.weight" in unet.state_dict()
