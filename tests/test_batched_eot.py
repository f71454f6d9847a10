"""Batched EOT: all draws of a step in one ``purify_draws`` call give exactly what the loop
of one ``purify`` call per draw gave (same randomness, same images, same gradients), for
every registered defense and for the attacks that average over draws. The committed
leaderboards were computed with the loop, so "exactly" here means bit for bit."""

import pytest
import torch

from iwmf_bench import load_model, registry
from iwmf_bench.attacks.apgd import APGD
from iwmf_bench.attacks.base import AttackTask
from iwmf_bench.attacks.square import Square
from iwmf_bench.data import load_folder
from iwmf_bench.defenses.base import Defense
from iwmf_bench.defenses.iwmf import IWMF
from iwmf_bench.errors import BenchError

pytestmark = pytest.mark.usefixtures("one_thread")  # small workloads: see conftest

TINY_DIFFUSION = {"config": "tiny", "pretrained": False, "timesteps": 2}
# Every built-in defense, CPU-cheap settings (TVM: few solver iterations; diffusion: the
# tiny random UNet), and the variants that draw differently (IWMF's shared windows).
CASES = {
    "none": {}, "iwmf": {}, "iwmf-shared": {"shared": True}, "iwmf-zero": {"lambda_0": 0.0},
    "jpeg": {}, "median": {}, "bit-depth": {}, "random-resize-pad": {}, "gaussian-noise": {},
    "tvm": {"iterations": 5}, "diffpure": TINY_DIFFUSION, "iwmfdiff": TINY_DIFFUSION,
}
DRAWS, IMAGES = 3, 2


def build(case: str) -> Defense:
    name = case.split("-shared")[0].split("-zero")[0]
    return registry.create("defenses", name, **CASES[case])


def loop(defense, xs, generator, draws, grad_mode):
    """The reference: one purify call per draw, the generator carried along."""
    return torch.cat([defense.purify(chunk, generator, grad_mode) for chunk in xs.split(xs.shape[0] // draws)])


def test_every_builtin_defense_is_covered():
    builtins = {name for name, entry in registry.available("defenses").items()
                if entry.factory.__module__.startswith("iwmf_bench.")}
    assert builtins <= {case.split("-shared")[0].split("-zero")[0] for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_purify_draws_equals_the_loop(case):
    defense = build(case)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(IMAGES, 3, 32, 32, generator=g, dtype=torch.float32)
    cotangent = torch.randn(DRAWS * IMAGES, 3, 32, 32, generator=g)
    for mode in defense.grad_modes:
        outs, grads, states = [], [], []
        for run in (defense.purify_draws, lambda *a: loop(defense, *a)):
            gen = torch.Generator().manual_seed(11)
            xs = x.repeat(DRAWS, 1, 1, 1).requires_grad_(mode != "none")
            out = run(xs, gen, DRAWS, mode)
            outs.append(out.detach())
            states.append(gen.get_state())
            if mode != "none":
                grads.append(torch.autograd.grad(out, xs, cotangent)[0])
        assert torch.equal(outs[0], outs[1]), f"{case} {mode}: images differ"
        assert torch.equal(states[0], states[1]), f"{case} {mode}: the generator advanced differently"
        if grads:
            assert torch.equal(grads[0], grads[1]), f"{case} {mode}: gradients differ"
    if defense.stochastic:  # the draws really differ: one call did not reuse one draw
        assert not torch.equal(outs[0][:IMAGES], outs[0][IMAGES:2 * IMAGES])


@pytest.mark.parametrize("name", ["diffpure", "iwmfdiff"])
def test_diffusion_draws_in_one_run_take_the_loops_randomness(name):
    """``draws_in_one_run`` (the CUDA default) forced on the CPU. With ``batch_size=1``
    every UNet call sees one image either way, so any difference would be randomness
    taken in another order: images, gradients and generator state are bit for bit the
    loop's. With the default chunks the UNet's batch-size-dependent rounding is all that
    differs (measured about 4e-6 on these images)."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(IMAGES, 3, 32, 32, generator=g)
    cotangent = torch.randn(DRAWS * IMAGES, 3, 32, 32, generator=g)
    for batch_size, exact in ((1, True), (8, False)):
        defense = registry.create("defenses", name, **TINY_DIFFUSION, batch_size=batch_size,
                                  draws_in_one_run=True)
        assert defense.speed_options("cpu")["draws_in_one_run"] is True
        outs, grads, states = [], [], []
        for run in (defense.purify_draws, lambda *a: loop(defense, *a)):
            gen = torch.Generator().manual_seed(11)
            xs = x.repeat(DRAWS, 1, 1, 1).requires_grad_(True)
            out = run(xs, gen, DRAWS, "exact")
            outs.append(out.detach())
            grads.append(torch.autograd.grad(out, xs, cotangent)[0])
            states.append(gen.get_state())
        assert torch.equal(states[0], states[1])
        if exact:
            assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
        else:
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=5e-5)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)
        assert not torch.equal(outs[0][:IMAGES], outs[0][IMAGES:2 * IMAGES])  # draws differ


def test_purify_draws_checks_its_input():
    with pytest.raises(BenchError, match="equal draws"):
        IWMF(shared=True).purify_draws(torch.rand(5, 3, 8, 8), None, 2)
    with pytest.raises(BenchError, match="grad_mode"):
        IWMF(shared=True).purify_draws(torch.rand(4, 3, 8, 8), None, 2, "magic")


# --- attacks: the real offline model on a few shared images ------------------------------

@pytest.fixture(scope="module")
def faces(shared_imgs):
    """dlib-resnet and three source/target pairs (resized, not aligned: equality needs no
    alignment); the threshold is lowered so that no pair is accepted before the attack."""
    model = load_model("dlib-resnet")
    src = load_folder(shared_imgs / "source", size=150).images[:3]
    tgt = load_folder(shared_imgs / "target", size=150).images[:3]
    with torch.no_grad():
        refs = model.embed(tgt)
    return model, src, refs


def attack_both_ways(attack, task):
    results = []
    for batched in (True, False):
        attack.batched_eot = batched
        results.append(attack.run(task))
    return results


@pytest.mark.parametrize("shared,grad_mode,per_call", [(False, "exact", None), (True, "bpda", 3)])
def test_apgd_eot_through_iwmf_is_unchanged(faces, shared, grad_mode, per_call):
    model, src, refs = faces
    attack = APGD(eps=0.03, steps=3, eot_iter=4, grad_mode=grad_mode)
    attack.draws_per_call = per_call  # 3: draws in groups of 3 and 1, same result again
    task = AttackTask(model, src, refs, IWMF(0.25, shared=shared), seed=3, threshold=0.3)
    batched, looped = attack_both_ways(attack, task)
    assert torch.equal(batched.adversarial, looped.adversarial)
    # Every loss along the way, not only the end point: the same floats.
    assert batched.info["objective_trace"] == looped.info["objective_trace"]
    assert torch.equal(batched.info["objective"], looped.info["objective"])
    assert torch.equal(batched.info["final_step_size"], looped.info["final_step_size"])
    assert batched.queries.tolist() == looped.queries.tolist()


@pytest.mark.parametrize("per_call", [None, 2])
def test_square_eot_through_iwmf_is_unchanged(faces, per_call):
    """Square with IWMF in its loop: each loss estimate's draws in one call (or groups of 2
    and 1) give the loop's search, bit for bit."""
    model, src, refs = faces
    attack = Square(eps=0.03, queries=30, eot_iter=3)
    attack.draws_per_call = per_call
    task = AttackTask(model, src, refs, IWMF(0.25), seed=3, threshold=0.3)
    batched, looped = attack_both_ways(attack, task)
    assert torch.equal(batched.adversarial, looped.adversarial)
    assert torch.equal(batched.info["objective"], looped.info["objective"])
    assert batched.queries.tolist() == looped.queries.tolist() == [30] * 3


def test_autoattack_rand_flavour_through_iwmf_is_unchanged(faces):
    pytest.importorskip("pyautoattack", reason="the [suites] extra is installed by scripts/setup.sh")
    from iwmf_bench.attacks.autoattack import AutoAttack

    model, src, refs = faces
    attack = AutoAttack(eps=0.01, steps=3, eot_iter=3, attacks=["apgd-ce"])
    task = AttackTask(model, src[:2], refs[:2], IWMF(0.25), seed=3, threshold=0.3)
    batched, looped = attack_both_ways(attack, task)
    assert batched.queries.sum() > 8 * 2  # APGD-CE ran (the pairs were not accepted before)
    assert torch.equal(batched.adversarial, looped.adversarial)
    assert torch.equal(batched.info["objective"], looped.info["objective"])
    assert batched.queries.tolist() == looped.queries.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["iwmf", "iwmf-shared", "gaussian-noise", "random-resize-pad", "iwmfdiff"])
def test_purify_draws_equals_the_loop_on_cuda(case):
    """The same equality on the GPU (IWMF through its Triton kernel there): one call of
    batch x draws images gives the loop's images, gradients and generator state. IWMF-Diff
    runs its draws in one DDRM run on CUDA (``draws_in_one_run``): in float32 and one image
    per UNet call, so that only the order of the randomness could differ."""
    defense = build(case) if case != "iwmfdiff" else registry.create(
        "defenses", case, **TINY_DIFFUSION, dtype="float32", batch_size=1)
    defense = defense.to("cuda")
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.rand(IMAGES, 3, 32, 32, generator=g, device="cuda")
    cotangent = torch.randn(DRAWS * IMAGES, 3, 32, 32, generator=g, device="cuda")
    mode = "exact" if "exact" in defense.grad_modes else defense.grad_modes[0]
    outs, grads = [], []
    for run in (defense.purify_draws, lambda *a: loop(defense, *a)):
        gen = torch.Generator(device="cuda").manual_seed(11)
        xs = x.repeat(DRAWS, 1, 1, 1).requires_grad_(mode != "none")
        out = run(xs, gen, DRAWS, mode)
        outs.append(out.detach())
        if mode != "none":
            grads.append(torch.autograd.grad(out, xs, cotangent)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    if grads:
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_apgd_eot_through_iwmf_is_unchanged_on_cuda(faces):
    model, src, refs = faces
    model = model.to("cuda")
    attack = APGD(eps=0.03, steps=3, eot_iter=4, grad_mode="exact")
    task = AttackTask(model, src.cuda(), refs.cuda(), IWMF(0.25).to("cuda"), seed=3, threshold=0.3)
    batched, looped = attack_both_ways(attack, task)
    torch.testing.assert_close(batched.adversarial, looped.adversarial, rtol=0, atol=1e-6)
    assert batched.queries.tolist() == looped.queries.tolist()
