"""The fused Triton IWMF kernel (defenses/iwmf_triton.py) equals the CPU kernel, forward and
adjoint. Without a GPU it runs in Triton's interpreter on CPU tensors, which must be on
before Triton is first imported: the ``interpreted`` tests run under
``TRITON_INTERPRET=1`` only, and :func:`test_interpreted_run` runs them so in a
subprocess. The CUDA tests (``-m gpu``) run the compiled kernel. Everything is skipped
where Triton is not installed."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton ships with torch's Linux CUDA builds; not installed here")

from iwmf_bench.defenses import iwmf_triton  # noqa: E402
from iwmf_bench.defenses.iwmf import IWMF, _apply_in_order, _top_left, draw_centres, iwmf_apply  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (test_interpreted_run)")


def test_interpreted_run():
    """The interpreter tests, in a process where Triton is imported with the interpreter on."""
    if INTERPRETED:
        pytest.skip("this is the interpreted run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-m", "not gpu", "-k", "interpreted_ and not interpreted_run"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "skipped" not in proc.stdout, proc.stdout[-2000:]


def cpu_kernel(x, centres, s, reverse=False):
    """The compiled sequential definition (the CPU default), windows reversed for A^T."""
    tl = _top_left(centres, x.shape[0], x.shape[2], x.shape[3], s)
    out = x.detach().clone().contiguous()
    _apply_in_order(out.numpy(), np.ascontiguousarray(tl[:, ::-1]) if reverse else tl, s)
    return out


def pile(batch):
    """Windows piled on a few positions: dependency chains inside one chunk."""
    seq = torch.tensor([[4, 4], [5, 4], [4, 5], [3, 3], [4, 4], [5, 5], [3, 5], [4, 3]] * 5)
    return seq.unsqueeze(0).expand(batch, -1, -1)


# (s, H, W, lambda_0, shared, dtype): small, the interpreter takes about a second a call.
CASES = [(3, 16, 16, 0.5, False, torch.float32), (2, 13, 11, 0.8, True, torch.float32),
         (5, 12, 14, 0.6, False, torch.float64)]


@interpreted
@pytest.mark.parametrize("s,h,w,lam,shared,dtype", CASES)
def test_interpreted_forward_and_adjoint_equal_the_cpu_kernel(s, h, w, lam, shared, dtype):
    g = torch.Generator().manual_seed(h * w + s)
    x = torch.rand(2, 3, h, w, generator=g, dtype=dtype)
    centres = draw_centres(2, h, w, int(lam * h * w), s, g, shared=shared)
    tl = torch.from_numpy(_top_left(centres, 2, h, w, s))
    for reverse in (False, True):
        got = iwmf_triton.apply_windows(x, tl, s, reverse)
        want = cpu_kernel(x, centres, s, reverse)
        if dtype == torch.float32:  # float64 accumulation in both: the same floats
            assert torch.equal(got, want), f"reverse={reverse}"
        else:  # only the order of the nine additions differs
            assert (got - want).abs().max().item() <= 1e-14
    assert not torch.equal(x, got)  # x untouched, the result a new tensor


@interpreted
def test_interpreted_dependency_chains_inside_a_chunk():
    x = torch.rand(1, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    centres = pile(1)
    tl = torch.from_numpy(_top_left(centres, 1, 9, 9, 3))
    for reverse in (False, True):
        assert torch.equal(iwmf_triton.apply_windows(x, tl, 3, reverse), cpu_kernel(x, centres, 3, reverse))


@interpreted
def test_interpreted_gradients_through_the_triton_kernel():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 12, 12, generator=g)
    centres = draw_centres(2, 12, 12, 60, 3, g)
    v = torch.randn(x.shape, generator=g)
    grads = []
    for kernel in ("triton", "numba"):
        xr = x.clone().requires_grad_(True)
        out = iwmf_apply(xr, centres, 3, kernel=kernel)
        grads.append((out.detach(), torch.autograd.grad(out, xr, v)[0]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@interpreted
def test_interpreted_half_precision_matches_the_torch_levels():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 12, 12, generator=g).half()
    centres = draw_centres(1, 12, 12, 70, 3, g)
    got = iwmf_apply(x, centres, 3, kernel="triton")
    want = iwmf_apply(x, centres, 3, kernel="levels")
    assert got.dtype == torch.float16 and (got.float() - want.float()).abs().max().item() <= 2e-3


@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernel, not the interpreted one")
def test_kernel_compiles_for_a_hopper_gpu():
    """No GPU needed: Triton compiles the kernel to PTX and a cubin for sm_90 (the H200)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for pointer, acc in (("*fp32", tl.float64), ("*bf16", tl.float32)):
        signature = {"img_ptr": pointer, "win_ptr": "*i32", "n": "i32", "channels": "i32", "height": "i32",
                     "width": "i32", "S": "constexpr", "AREA_P2": "constexpr", "CHUNK": "constexpr",
                     "REVERSE": "constexpr", "ACC": "constexpr"}
        constants = {"S": 3, "AREA_P2": 16, "CHUNK": iwmf_triton.CHUNK, "REVERSE": True, "ACC": acc}
        try:
            kernel = triton.compile(ASTSource(iwmf_triton._iwmf_planes, signature, constants),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": iwmf_triton.NUM_WARPS})
        except RuntimeError as exc:  # e.g. no ptxas in this Triton build
            if "ptxas" in str(exc).lower():
                pytest.skip(f"no CUDA toolchain in this Triton: {exc}")
            raise
        assert "bar.sync" in kernel.asm["ptx"]  # the barrier between levels survived


# --- on a GPU -------------------------------------------------------------------------

def _timed(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@pytest.mark.gpu
def test_cuda_uses_triton_and_equals_the_cpu_kernel():
    assert iwmf_triton.available()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g)
    centres = draw_centres(4, 64, 64, int(0.5 * 64 * 64), 3, g)
    v = torch.randn(x.shape, generator=g)
    xc = x.cuda().requires_grad_(True)
    out = iwmf_apply(xc, centres, 3)
    (grad,) = torch.autograd.grad(out, xc, v.cuda())
    assert torch.equal(out.detach().cpu(), cpu_kernel(x, centres, 3))
    assert torch.equal(grad.cpu(), cpu_kernel(v, centres, 3, reverse=True))
    for dtype, tol in ((torch.float64, 1e-14), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        got = iwmf_apply(x.to("cuda", dtype), centres, 3).float().cpu()
        want = iwmf_apply(x.to("cuda", dtype), centres, 3, kernel="levels").float().cpu()
        assert (got - want).abs().max().item() <= tol, dtype
    pile_x = torch.rand(2, 3, 9, 9, generator=g)
    assert torch.equal(iwmf_apply(pile_x.cuda(), pile(2), 3).cpu(), cpu_kernel(pile_x, pile(2), 3))
    # The defense on CUDA: same images as on the CPU for the same generator.
    d = IWMF(0.25)
    assert torch.equal(d.purify(x.cuda(), torch.Generator().manual_seed(1)).cpu(),
                       d.purify(x, torch.Generator().manual_seed(1)))


@pytest.mark.gpu
def test_cuda_triton_beats_the_torch_levels_at_batch_20():
    """A floor, not the benchmark (benchmarks/iwmf.py --device cuda measures)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 3, 160, 160, generator=g).cuda()
    centres = draw_centres(20, 160, 160, int(0.25 * 160 * 160), 3, g)
    triton_s = _timed(lambda: iwmf_apply(x, centres, 3))
    levels_s = _timed(lambda: iwmf_apply(x, centres, 3, kernel="levels"))
    assert triton_s < levels_s, (triton_s, levels_s)
