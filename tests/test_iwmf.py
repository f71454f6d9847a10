"""IWMF: exactness against the definition, gradients, randomness discipline."""

import pytest
import torch

from iwmf_bench import get_defense
from iwmf_bench.defenses.iwmf import (IWMF, _apply_by_levels_autograd, _top_left, _Windows, _WindowSequence,
                                     dependency_levels, draw_centres, iwmf, iwmf_apply)
from iwmf_bench.errors import BenchError


def reference_iwmf(x, centres, s):
    """The definition, window by window, one image at a time (float64 accumulation)."""
    out = x.clone().double()
    if centres.dim() == 2:
        centres = centres.unsqueeze(0).expand(x.shape[0], -1, -1)
    for b in range(x.shape[0]):
        for r, c in centres[b].tolist():
            r0, c0 = r - s // 2, c - s // 2
            window = out[b, :, r0:r0 + s, c0:c0 + s]
            window[:] = window.mean(dim=(1, 2), keepdim=True)
    return out.to(x.dtype)


CASES = [(2, 17, 23), (3, 16, 16), (3, 31, 20), (5, 22, 29), (5, 12, 12)]


@pytest.mark.parametrize("s,h,w", CASES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("path", ["inference", "autograd"])
def test_matches_sequential_definition(s, h, w, shared, path):
    g = torch.Generator().manual_seed(1000 * s + h + w)
    x = torch.rand(3, 3, h, w, generator=g)
    centres = draw_centres(3, h, w, int(0.6 * h * w), s, g, shared=shared)
    if path == "autograd":
        x.requires_grad_(True)
    got = iwmf_apply(x, centres, s)
    want = reference_iwmf(x.detach(), centres, s)
    assert got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-6


def test_heavily_overlapping_windows_and_order_matters():
    # Windows piled on the same few positions: every one depends on the previous.
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seq = torch.tensor([[4, 4], [5, 4], [4, 5], [3, 3], [4, 4], [5, 5], [3, 5], [4, 3]])
    levels = dependency_levels(seq, 9, 9, 3)
    assert levels.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]  # a chain: all overlap their predecessor
    for path in ("inference", "autograd"):
        xi = x.clone().requires_grad_(path == "autograd")
        assert torch.allclose(iwmf_apply(xi, seq, 3), reference_iwmf(x, seq, 3), atol=1e-12, rtol=0)
    # Reversing the order changes the result: the filter is sequential, not a set.
    assert not torch.allclose(iwmf_apply(x, seq.flip(0), 3), iwmf_apply(x, seq, 3))


def test_disjoint_windows_share_one_level():
    seq = torch.tensor([[1, 1], [1, 4], [4, 1], [4, 4], [2, 2]])
    assert dependency_levels(seq, 6, 6, 3).tolist() == [[0, 0, 0, 0, 1]]


def test_window_mean_is_written_per_channel():
    x = torch.zeros(1, 3, 3, 3, dtype=torch.float64)
    x[0, 0, 0, 0], x[0, 1, 2, 2], x[0, 2] = 9.0, 18.0, 0.5
    out = iwmf_apply(x, torch.tensor([[1, 1]]), 3)
    assert torch.equal(out[0, 0], torch.full((3, 3), 1.0, dtype=torch.float64))
    assert torch.equal(out[0, 1], torch.full((3, 3), 2.0, dtype=torch.float64))
    assert torch.equal(out[0, 2], torch.full((3, 3), 0.5, dtype=torch.float64))


def windows_applied(centres, x, s, compiled):
    """iwmf_apply's autograd Function with the schedule forced: the compiled kernel (CPU
    default) or the dependency levels (GPU default, run here on CPU)."""
    tl = _top_left(centres, x.shape[0], x.shape[2], x.shape[3], s)
    windows = _Windows(tl, s, tuple(x.shape), x.device, x.dtype, compiled=compiled)
    return _WindowSequence.apply(x, windows, False)


@pytest.mark.parametrize("compiled", [True, False])
def test_gradcheck_and_gradgradcheck(compiled):
    # The backward is the same linear map on reversed windows, differentiable in turn.
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 8, 7, dtype=torch.float64, generator=g, requires_grad=True)
    centres = draw_centres(2, 8, 7, 40, 3, g)
    fn = lambda t: windows_applied(centres, t, 3, compiled)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda t: iwmf_apply(t, centres, 3), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])  # a few ulp
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("s", [2, 3, 5])
def test_gradients_equal_dependency_level_autograd(dtype, tol, shared, s):
    # Reference: autograd through the differentiable dependency-level gathers/scatters
    # (the previous implementation). Ours: the kernel run on the reversed windows.
    g = torch.Generator().manual_seed(10 + s)
    x = torch.rand(3, 3, 29, 26, generator=g).to(dtype).requires_grad_(True)
    centres = draw_centres(3, 29, 26, int(0.5 * 29 * 26), s, g, shared=shared)
    v = torch.randn(3, 3, 29, 26, generator=g).to(dtype)
    tl = _top_left(centres, 3, 29, 26, s)
    (want,) = torch.autograd.grad(_apply_by_levels_autograd(x, tl, s), x, v)
    for compiled in (True, False):
        (got,) = torch.autograd.grad(windows_applied(centres, x, s, compiled), x, v)
        assert got.dtype == dtype
        assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    (got,) = torch.autograd.grad(iwmf_apply(x, centres, s), x, v)
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    # The forward of the differentiable path is the inference result, bit for bit.
    assert torch.equal(iwmf_apply(x, centres, s).detach(), iwmf_apply(x.detach(), centres, s))


def test_inputs_and_incoming_gradients_are_not_modified():
    # The kernel writes in place into numpy memory: it must only ever see private copies,
    # also for channels-last inputs and expanded (stride-0) or transposed gradients.
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    x_before = x.detach().clone()
    centres = draw_centres(2, 12, 12, 60, 3, g)
    tl = _top_left(centres, 2, 12, 12, 3)
    out = iwmf_apply(x, centres, 3)
    assert torch.equal(x.detach(), x_before)
    assert torch.allclose(out, reference_iwmf(x_before, centres, 3), atol=1e-12, rtol=0)
    v = torch.randn(2, 3, 12, 12, generator=g, dtype=torch.float64).transpose(2, 3)
    v_before = v.clone()
    (got,) = torch.autograd.grad(out, x, v, retain_graph=True)
    assert torch.equal(v, v_before)
    (want,) = torch.autograd.grad(_apply_by_levels_autograd(x, tl, 3), x, v)
    assert torch.allclose(got, want, atol=1e-13, rtol=0)
    out.sum().backward()  # incoming gradient: ones expanded with stride 0
    assert torch.equal(x.detach(), x_before) and torch.allclose(x.grad, torch.ones_like(x))


def test_double_backward_is_the_forward_map_again():
    # d/dv <A^T v, w> = A w: differentiating the backward applies the windows in order.
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 10, 9, generator=g, dtype=torch.float64, requires_grad=True)
    centres = draw_centres(2, 10, 9, 50, 3, g)
    v = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(iwmf_apply(x, centres, 3), x, v, create_graph=True)
    (gv,) = torch.autograd.grad((gx * w).sum(), v)
    assert torch.allclose(gv, reference_iwmf(w, centres, 3), atol=1e-13, rtol=0)


def test_autograd_gradient_equals_linear_operator():
    # For fixed windows IWMF is linear: out = A x. Its gradient w.r.t. x of <v, out> is A^T v.
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    centres = draw_centres(1, 6, 6, 20, 3, g)
    v = torch.randn(1, 1, 6, 6, dtype=torch.float64, generator=g)
    (iwmf_apply(x, centres, 3) * v).sum().backward()
    basis = torch.eye(36, dtype=torch.float64).view(36, 1, 6, 6)
    A = torch.stack([iwmf_apply(e.unsqueeze(0), centres, 3).flatten() for e in basis], dim=1)
    assert torch.allclose(x.grad.flatten(), A.T @ v.flatten(), atol=1e-12)


def test_window_count_and_centre_range():
    g = torch.Generator().manual_seed(5)
    c = draw_centres(4, 20, 30, int(0.25 * 20 * 30), 3, g)
    assert c.shape == (4, 150, 2)
    c = draw_centres(1, 20, 30, 200_000, 3, g)[0]
    assert c[:, 0].min() == 1 and c[:, 0].max() == 18 and c[:, 1].min() == 1 and c[:, 1].max() == 28
    # Uniform over the 18 x 28 valid positions: chi-square with 503 dof, fixed seed.
    counts = torch.bincount((c[:, 0] - 1) * 28 + (c[:, 1] - 1), minlength=18 * 28).double()
    expected = 200_000 / (18 * 28)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert 503 - 5 * (2 * 503) ** 0.5 < chi2 < 503 + 5 * (2 * 503) ** 0.5
    # Even window sizes: top-left = centre - s//2 stays inside.
    c2 = draw_centres(1, 5, 5, 5000, 2, g)[0]
    assert c2.min() == 1 and c2.max() == 4


def test_seeded_and_independent_of_global_rng():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = iwmf(x, 0.25, generator=torch.Generator().manual_seed(7))
    b = iwmf(x, 0.25, generator=torch.Generator().manual_seed(7))
    c = iwmf(x, 0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_image_sequences_do_not_depend_on_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 24, 24, generator=g)
    whole = iwmf(x, 0.3, generator=torch.Generator().manual_seed(1))
    alone = iwmf(x[:1], 0.3, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    chunked = torch.cat([iwmf(x[:3], 0.3, generator=gen), iwmf(x[3:], 0.3, generator=gen)])
    assert torch.equal(whole[:1], alone)
    assert torch.equal(whole, chunked)
    # Identical inputs get different windows by default, the same windows when shared.
    same = x[:1].expand(2, -1, -1, -1)
    assert not torch.equal(*iwmf(same, 0.3, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(*iwmf(same, 0.3, generator=torch.Generator().manual_seed(2), shared=True))


def test_defense_grad_modes():
    defense = get_defense("iwmf", lambda_0=0.25)
    assert isinstance(defense, IWMF) and defense.stochastic
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = defense.purify(x, torch.Generator().manual_seed(0), grad_mode="bpda")
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
    x.grad = None
    exact = defense.purify(x, torch.Generator().manual_seed(0), grad_mode="exact")
    # Same windows for the same seed (the two paths round the means differently).
    assert (exact.detach() - out.detach()).abs().max() <= 1e-6
    # A window keeps the sum of its pixels, so d(sum out)/dx would be 1 here too: weight it.
    w = torch.linspace(0, 1, 16).view(1, 1, 1, 16)
    (exact * w).sum().backward()
    assert not torch.allclose(x.grad, w.expand_as(x))
    none = defense.purify(x, torch.Generator().manual_seed(0))
    assert not none.requires_grad


def test_lambda_zero_is_identity_and_bad_input_is_refused():
    x = torch.rand(1, 3, 10, 10)
    assert torch.equal(IWMF(lambda_0=0.0).purify(x, torch.Generator().manual_seed(0)), x)
    with pytest.raises(BenchError, match="NaN"):
        IWMF().purify(torch.full((1, 3, 8, 8), float("nan")))
    for bad in (float("nan"), float("inf"), -float("inf")):  # one bad value in a valid batch
        y = torch.rand(2, 3, 8, 8)
        y[1, 2, 3, 4] = bad
        with pytest.raises(BenchError, match=r"contains 1 NaN or infinite value\(s\), the first at "
                                             r"\(image, channel, row, col\) = \(1, 2, 3, 4\)"):
            IWMF().purify(y)
    with pytest.raises(BenchError, match=r"\[0,1\]"):
        IWMF().purify(torch.full((1, 3, 8, 8), 255.0))
    with pytest.raises(BenchError, match="4-D"):
        IWMF().purify(torch.rand(3, 8, 8))
    with pytest.raises(BenchError, match="inside"):
        iwmf_apply(torch.rand(1, 3, 8, 8), torch.tensor([[0, 4]]), 3)
    with pytest.raises(BenchError, match="lambda_0"):
        IWMF(lambda_0=-1)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 40, 40, generator=g)
    centres = draw_centres(4, 40, 40, 400, 3, g)
    got = iwmf_apply(x.cuda(), centres, 3).cpu()
    assert (got - reference_iwmf(x, centres, 3)).abs().max().item() <= 1e-6
    v = torch.randn(4, 3, 40, 40, generator=g)
    xc = x.cuda().requires_grad_(True)
    (got,) = torch.autograd.grad(iwmf_apply(xc, centres, 3), xc, v.cuda())
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(iwmf_apply(xr, centres, 3), xr, v)
    assert (got.cpu() - want).abs().max().item() <= 2e-6 * want.abs().max().item()
