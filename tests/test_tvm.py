"""TVM (Guo et al. 2018): the solver against a reference minimiser, gradients, randomness
discipline, and what it does to a perturbed face."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
from PIL import Image

from iwmf_bench import get_defense
from iwmf_bench.defenses.tvm import (TVM, _differences, _differences_adjoint, draw_keep_mask, tv_objective,
                                    tv_objective_gradient, tv_reconstruct, tvm)
from iwmf_bench.errors import BenchError

LAM, EPS = 0.03, 0.01


def face(shared_imgs, name="00000_25.png", crop=None):
    """A shared face as a (1, 3, H, W) float64 tensor in [0,1], optionally centre-cropped."""
    img = np.asarray(Image.open(shared_imgs / "source" / name).convert("RGB"), dtype=np.float64) / 255
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()
    if crop:
        top, left = (x.shape[2] - crop) // 2, (x.shape[3] - crop) // 2
        x = x[:, :, top:top + crop, left:left + crop].contiguous()
    return x


def reference_objective(z, x, mask, lam, eps):
    """The objective written from its definition: forward differences, none across the
    last row / column, isotropic smoothed norm per pixel."""
    dx = torch.zeros_like(z)
    dy = torch.zeros_like(z)
    dx[..., :, :-1] = torch.diff(z, dim=-1)
    dy[..., :-1, :] = torch.diff(z, dim=-2)
    return 0.5 * (mask * (z - x) ** 2).sum() + lam * torch.sqrt(dx ** 2 + dy ** 2 + eps ** 2).sum()


def reference_minimiser(x, mask, lam, eps):
    """L-BFGS (scipy) on :func:`reference_objective`, run to a tight tolerance."""
    def fun(flat):
        z = torch.from_numpy(flat).view_as(x).requires_grad_(True)
        value = reference_objective(z, x, mask, lam, eps)
        (grad,) = torch.autograd.grad(value, z)
        return value.item(), grad.numpy().ravel().copy()

    res = scipy.optimize.minimize(fun, x.numpy().ravel().copy(), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 20000, "maxcor": 20, "ftol": 1e-16, "gtol": 1e-11})
    return torch.from_numpy(res.x).view_as(x)


def test_differences_adjoint_and_objective_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    px, py = torch.randn(2, 2, 3, 7, 9, generator=g, dtype=torch.float64)
    dx, dy = _differences(z)
    assert abs(float((dx * px + dy * py).sum() - (z * _differences_adjoint(px, py)).sum())) < 1e-12
    x = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 3, 7, 9, generator=g) < 0.5).double()
    zr = z.clone().requires_grad_(True)
    value = reference_objective(zr, x, mask, LAM, EPS)
    (want,) = torch.autograd.grad(value, zr)
    assert abs(float(tv_objective(z, x, mask, LAM, EPS).sum() - value.detach())) < 1e-12
    assert (tv_objective_gradient(z, x, mask, LAM, EPS) - want).abs().max() < 1e-13


@pytest.mark.slow
def test_solver_reaches_the_reference_minimum_on_a_face(shared_imgs):
    x = face(shared_imgs, crop=96)
    mask = draw_keep_mask(1, tuple(x.shape[1:]), 0.5, torch.Generator().manual_seed(0)).double()
    ref = reference_minimiser(x, mask, LAM, EPS)
    e_ref = float(reference_objective(ref, x, mask, LAM, EPS))
    gaps, dists = {}, {}
    for iterations in (25, 100, 2000):
        z = tv_reconstruct(x, mask, LAM, iterations, EPS)
        gaps[iterations] = (float(reference_objective(z, x, mask, LAM, EPS)) - e_ref) / e_ref
        dists[iterations] = float((z - ref).abs().mean()) * 255
    print("relative objective gaps", gaps, "mean |z - ref| in /255", dists)
    # The long run agrees with L-BFGS: both found the minimiser (to float64 solver tolerance).
    assert abs(gaps[2000]) < 1e-9 and dists[2000] < 1e-3
    # The default budget (100 iterations) is close to it, 25 iterations is not.
    assert 0 <= gaps[100] < 1e-4 and dists[100] < 0.1
    assert gaps[25] > 10 * gaps[100]


def test_output_ignores_dropped_pixels_and_keeps_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 24, generator=g)
    mask = draw_keep_mask(2, (3, 20, 24), 0.5, torch.Generator().manual_seed(1))
    other = torch.where(mask, x, torch.rand(x.shape, generator=g))  # new values where dropped
    a, b = tv_reconstruct(x, mask, LAM, 30), tv_reconstruct(other, mask, LAM, 30)
    assert torch.equal(a, b) and not torch.equal(x, other)
    assert a.min() >= 0 and a.max() <= 1
    # lam = 0: kept pixels are returned as they are (fidelity alone, step 1).
    z = tv_reconstruct(x, mask, 0.0, 5)
    assert torch.equal(z[mask], x[mask])


def test_mask_statistics_and_per_image_draws():
    mask = draw_keep_mask(4, (3, 50, 50), 0.3, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 3, 50, 50) and mask.dtype == torch.bool
    n = mask.numel()
    assert abs(mask.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    # Channels drop independently (as in the authors' code): all three kept ~ 0.3^3.
    all_kept = mask.all(dim=1).float().mean().item()
    assert abs(all_kept - 0.027) < 4 * (0.027 * 0.973 / (n / 3)) ** 0.5
    gen = torch.Generator().manual_seed(0)
    chunked = torch.cat([draw_keep_mask(1, (3, 50, 50), 0.3, gen), draw_keep_mask(3, (3, 50, 50), 0.3, gen)])
    assert torch.equal(chunked, mask)


def test_seeded_chunkable_and_independent_of_global_rng():
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = tvm(x, generator=torch.Generator().manual_seed(7), iterations=20)
    b = tvm(x, generator=torch.Generator().manual_seed(7), iterations=20)
    c = tvm(x, generator=torch.Generator().manual_seed(8), iterations=20)
    gen = torch.Generator().manual_seed(7)
    chunked = torch.cat([tvm(x[:2], generator=gen, iterations=20), tvm(x[2:], generator=gen, iterations=20)])
    alone = tvm(x[:1], generator=torch.Generator().manual_seed(7), iterations=20)
    none_given = TVM(iterations=5).purify(x)  # fresh OS entropy, still not the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, chunked) and torch.equal(a[:1], alone)
    assert none_given.shape == x.shape
    # Identical images get different masks.
    same = tvm(x[:1].expand(2, -1, -1, -1), generator=torch.Generator().manual_seed(7), iterations=20)
    assert not torch.equal(same[0], same[1])
    # keep = 1 drops nothing, draws nothing, and is deterministic.
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    d = TVM(keep=1.0, iterations=20)
    assert not d.stochastic and torch.equal(d.purify(x, gen), d.purify(x))
    assert torch.equal(gen.get_state(), before)


@pytest.mark.parametrize("dtype,atol_out,rtol_grad", [(torch.float64, 1e-13, 1e-11), (torch.float32, 1e-5, 1e-4)])
def test_compiled_solver_equals_the_torch_iterations(dtype, atol_out, rtol_grad):
    # The compiled per-plane solver and its written-out adjoint against the same iterations
    # as torch operations differentiated by autograd (odd sizes, several planes, a border).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 19, 23, generator=g, dtype=dtype)
    mask = draw_keep_mask(2, (3, 19, 23), 0.5, torch.Generator().manual_seed(1))
    v = torch.randn(x.shape, generator=g, dtype=dtype)
    outs, grads = [], []
    for compiled in (True, False):
        xr = x.clone().requires_grad_(True)
        out = tv_reconstruct(xr, mask, LAM, 30, compiled=compiled)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, xr, v)[0])
    scale = float(grads[1].abs().max())
    print(f"{dtype}: max |out diff| {float((outs[0] - outs[1]).abs().max()):.2e}, "
          f"max |grad diff| {float((grads[0] - grads[1]).abs().max()):.2e} of {scale:.2f}")
    assert (outs[0] - outs[1]).abs().max() <= atol_out
    assert (grads[0] - grads[1]).abs().max() <= rtol_grad * scale
    # Without autograd the same kernel runs: the same values.
    with torch.no_grad():
        assert torch.equal(tv_reconstruct(x, mask, LAM, 30), outs[0])


def test_compiled_solver_gradcheck_and_refuses_a_second_derivative():
    x = (0.2 + 0.6 * torch.rand(1, 2, 9, 11, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)).requires_grad_(True)
    mask = draw_keep_mask(1, (2, 9, 11), 0.5, torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda t: tv_reconstruct(t, mask, LAM, 7, compiled=True), (x,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)
    # A second derivative would silently lack the Hessian terms: refused, naming the way out.
    with pytest.raises(BenchError, match="compiled=False"):
        torch.autograd.grad(tv_reconstruct(x, mask, LAM, 7).sum(), x, create_graph=True)


@pytest.mark.slow
def test_exact_gradient_passes_gradcheck():
    # Through the defense (mask drawn inside, generator re-seeded): the compiled solver, and
    # the torch iterations with few iterations so that several checkpoint blocks (of
    # round(sqrt(6)) = 2) are crossed; values away from 0 and 1 so the final clamp is inactive.
    x = (0.2 + 0.6 * torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)).requires_grad_(True)
    defense = TVM(iterations=6)

    def fn(t):
        return defense.purify(t, torch.Generator().manual_seed(0), grad_mode="exact")

    def torch_iterations(t):
        mask = draw_keep_mask(1, (3, 12, 12), 0.5, torch.Generator().manual_seed(0))
        return tv_reconstruct(t, mask, LAM, 6, compiled=False)

    assert torch.equal(fn(x), torch_iterations(x))
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradcheck(torch_iterations, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_checkpointing_bounds_saved_memory_and_changes_no_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    mask = draw_keep_mask(2, (3, 24, 24), 0.5, torch.Generator().manual_seed(1))
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def run(iterations, checkpoint):
        saved = {}  # storage -> bytes: what autograd keeps alive, each buffer counted once

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        xr = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = tv_reconstruct(xr, mask, LAM, iterations, checkpoint=checkpoint, compiled=False)
        (grad,) = torch.autograd.grad(out, xr, v)
        return sum(saved.values()) / (x.numel() * x.element_size()), grad  # in images

    plain_16, grad_plain = run(16, False)
    ckpt_16, grad_ckpt = run(16, True)
    plain_64, _ = run(64, False)
    ckpt_64, _ = run(64, True)
    print(f"images kept for backward: plain {plain_16:.1f} (16 it), {plain_64:.1f} (64 it); "
          f"checkpointed {ckpt_16:.1f}, {ckpt_64:.1f}")
    assert torch.equal(grad_plain, grad_ckpt)
    # Without checkpoints autograd keeps three images per iteration (measured). With them it
    # keeps each block's two state images (z, y): 4 blocks of 4 at 16 iterations, 8 of 8 at 64.
    assert plain_64 - plain_16 > 2 * 48 and plain_16 > 2 * 16
    assert ckpt_64 - ckpt_16 == pytest.approx(2 * (8 - 4), abs=0.01) and ckpt_16 < 16


def test_removes_most_of_a_high_frequency_perturbation(shared_imgs):
    x = face(shared_imgs).float()
    # +-8/255 per pixel and channel, random signs: the high-frequency end of an L-inf attack.
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    adv = (x + signs * 8 / 255).clamp(0, 1)
    defense = TVM()
    clean_out = defense.purify(x, torch.Generator().manual_seed(1))
    adv_out = defense.purify(adv, torch.Generator().manual_seed(1))  # same mask
    residual, delta = adv_out - clean_out, adv - x
    l2_ratio = float(residual.norm() / delta.norm())
    along = float((residual * delta).sum() / delta.norm() ** 2)  # share surviving as the perturbation itself
    change = float((clean_out - x).abs().mean()) * 255
    print(f"perturbation after TVM: L2 ratio {l2_ratio:.3f}, component along it {along:.3f}, "
          f"mean |residual| {float(residual.abs().mean()) * 255:.2f}/255 of {float(delta.abs().mean()) * 255:.2f}/255; "
          f"clean face changed by {change:.2f}/255")
    # Measured with these seeds: L2 ratio 0.33, along 0.15, clean change 3.9/255.
    assert l2_ratio < 0.4 and along < 0.25
    assert change < 6  # the face survives: a mild change on a clean image


def test_defense_contract_and_grad_modes():
    defense = get_defense("tvm", keep=0.5, lam=0.03, iterations=10)
    assert isinstance(defense, TVM) and defense.stochastic
    assert defense.config() == {"keep": 0.5, "lam": 0.03, "iterations": 10, "eps": EPS}
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    bpda = defense.purify(x, torch.Generator().manual_seed(0), grad_mode="bpda")
    bpda.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    x.grad = None
    exact = defense.purify(x, torch.Generator().manual_seed(0), grad_mode="exact")
    assert (exact.detach() - bpda.detach()).abs().max() < 1e-6
    exact.sum().backward()
    assert not torch.allclose(x.grad, torch.ones_like(x))
    assert not defense.purify(x, torch.Generator().manual_seed(0)).requires_grad


@pytest.mark.parametrize("options,message", [
    ({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"), ({"keep": "half"}, "keep"),
    ({"lam": -0.1}, "lam"), ({"lam": float("inf")}, "lam"),
    ({"iterations": 0}, "iterations"), ({"iterations": 2.5}, "iterations"), ({"iterations": True}, "iterations"),
    ({"eps": 0}, "eps"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(BenchError, match=message):
        TVM(**options)


def test_cli_bad_keep_is_one_line_exit_2(shared_imgs, tmp_path):
    exe = Path(sys.executable).with_name("iwmf-bench")
    r = subprocess.run([str(exe), "purify", "--defense", "tvm", "-D", "keep=0", "--input", str(shared_imgs / "source"),
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "keep" in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    cpu = tvm(x, generator=torch.Generator().manual_seed(1))
    gpu = tvm(x.cuda(), generator=torch.Generator().manual_seed(1)).cpu()
    assert (gpu - cpu).abs().max() < 1e-4
