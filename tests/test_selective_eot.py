"""Selective EOT: the gradient weights only the draws not yet broken; majority EOT: the
k-th best draw of each vote. On a toy problem where every draw's objective and gradient
can be computed by hand."""

from __future__ import annotations

import pytest
import torch

from iwmf_bench import registry
from iwmf_bench.attacks.base import AttackTask, make_generator
from iwmf_bench.attacks.eot import APGDEOT
from iwmf_bench.attacks.majority_eot import MajorityEOT, majority_weights, needed
from iwmf_bench.attacks.selective_eot import SelectiveEOT, selective_weights
from iwmf_bench.defenses.gaussian_noise import GaussianNoise
from iwmf_bench.errors import BenchError
from iwmf_bench.models.base import FaceModel


class Linear(FaceModel):
    """A toy face model: a fixed linear map of the pixels, euclidean distance."""

    input_size = 4
    metric = "euclidean"
    threshold = 1.0

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_weights_are_uniform_over_the_unbroken_draws():
    obj = torch.tensor([[0.5, -1.0, 0.2], [-0.3, -2.0, 0.1], [0.2, 0.7, 0.4]])  # (draws=3, N=3)
    w = selective_weights(obj, obj >= 0)
    # image 0: only draw 1 open -> all its weight; image 1: draws 0, 1 open; image 2: none -> uniform
    expected = torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]) + torch.tensor([0, 0, 1 / 3])
    assert torch.allclose(w, expected) and torch.allclose(w.sum(dim=0), torch.ones(3))


def _task(n=5):
    model = Linear().eval()
    gen = torch.Generator().manual_seed(1)
    sources = torch.rand(n, 3, 4, 4, generator=gen)
    refs = model(torch.rand(n, 3, 4, 4, generator=gen))
    return AttackTask(model, sources, refs, GaussianNoise(sigma=0.3), seed=0)


def _per_draw(attack, task, x, draws):
    """Each draw's objective and gradient, one purify call per draw from the same stream."""
    gen = make_generator(task.seed, attack.name, "defense")
    objs, grads = [], []
    for _ in range(draws):
        xr = x.detach().clone().requires_grad_(True)
        obj = attack.objective(task, xr, gen, "exact")
        (g,) = torch.autograd.grad(obj.sum(), xr)
        objs.append(obj.detach())
        grads.append(g)
    return torch.stack(objs), torch.stack(grads)


def test_gradient_is_the_mean_over_the_draws_not_yet_broken():
    task = _task()
    draws = 8
    attack = SelectiveEOT(norm="Linf", eps=0.1, steps=2, eot_iter=draws, grad_mode="exact")
    x = task.sources
    objs, grads = _per_draw(attack, task, x, draws)
    broken = objs >= 0  # impersonation: accepted
    assert broken.any() and (~broken).any(), "the toy must have both kinds of draws"
    loss, grad, used = attack._loss_and_grad(task, x, make_generator(task.seed, attack.name, "defense"), "exact",
                                             draws)
    assert used == draws
    assert torch.allclose(loss, objs.mean(dim=0), atol=1e-6)  # the schedule still sees the mean
    for i in range(x.shape[0]):
        open_ = ~broken[:, i]
        want = grads[open_, i].mean(dim=0) if open_.any() else grads[:, i].mean(dim=0)
        assert torch.allclose(grad[i], want, atol=1e-6), i
    # plain EOT on the same draws: the mean over all of them, which differs where some are broken
    plain = APGDEOT(norm="Linf", eps=0.1, steps=2, eot_iter=draws, grad_mode="exact")
    _, grad_plain, _ = plain._loss_and_grad(task, x, make_generator(task.seed, attack.name, "defense"), "exact",
                                            draws)
    assert torch.allclose(grad_plain, grads.mean(dim=0), atol=1e-6)
    mixed = [i for i in range(x.shape[0]) if broken[:, i].any() and (~broken[:, i]).any()]
    assert mixed and not torch.allclose(grad[mixed], grad_plain[mixed], atol=1e-6)


def test_registered_and_runs_as_an_adaptive_attack():
    task = _task()
    attack = registry.create("attacks", "selective-eot", norm="Linf", eps=0.1, steps=3, eot_iter=4, grad_mode="exact")
    result = attack.run(task)
    assert isinstance(attack, SelectiveEOT)
    assert result.adversarial.shape == task.sources.shape
    assert (result.adversarial - task.sources).abs().max() <= 0.1 + 1e-6
    assert int(result.queries[0]) == 4 * 4  # (steps + 1) x draws: APGD-EOT's cost


def test_majority_weights_take_the_open_draws_among_the_k_best():
    # one vote of 4 draws (rows), 3 images (columns); k = 3 draws must be won
    obj = torch.tensor([[0.5, -1.0, 0.9], [-0.3, -2.0, 0.1], [0.2, 0.7, 0.4], [-0.9, -0.5, 0.3]])
    kth, w = majority_weights(obj, obj >= 0, 3)
    # image 0: best three are draws 0, 2, 1 (0.5, 0.2, -0.3): only draw 1 is open
    # image 1: best three 2, 3, 0 (0.7, -0.5, -1.0): draws 3 and 0 open
    # image 2: best three 0, 2, 3, all won: uniform over them
    assert torch.allclose(kth, torch.tensor([-0.3, -1.0, 0.3]))
    expected = torch.tensor([[0.0, 0.5, 1 / 3], [1.0, 0.0, 0.0], [0.0, 0.0, 1 / 3], [0.0, 0.5, 1 / 3]])
    assert torch.allclose(w, expected)
    assert needed(10, "impersonation") == 6 and needed(10, "dodging") == 5 and needed(5, "dodging") == 3


def test_majority_eot_gradient_follows_the_kth_best_draw_of_each_vote():
    task = _task()
    draws, vote = 8, 4
    attack = MajorityEOT(norm="Linf", eps=0.1, steps=2, eot_iter=draws, vote=vote, grad_mode="exact")
    x = task.sources
    objs, grads = _per_draw(attack, task, x, draws)
    loss, grad, used = attack._loss_and_grad(task, x, make_generator(task.seed, attack.name, "defense"), "exact",
                                             draws)
    assert used == draws
    k = vote // 2 + 1
    want_loss, want_grad = torch.zeros(x.shape[0]), torch.zeros_like(x)
    for v in range(draws // vote):
        for i in range(x.shape[0]):
            o = objs[v * vote:(v + 1) * vote, i]
            best = sorted(range(vote), key=lambda d: -float(o[d]))[:k]
            want_loss[i] += sorted(o.tolist(), reverse=True)[k - 1]
            open_ = [d for d in best if o[d] < 0] or best
            want_grad[i] += torch.stack([grads[v * vote + d, i] for d in open_]).mean(dim=0)
    assert torch.allclose(loss, want_loss / (draws // vote), atol=1e-6)
    assert torch.allclose(grad, want_grad / (draws // vote), atol=1e-6)
    with pytest.raises(BenchError, match="vote must be a positive integer dividing eot_iter"):
        MajorityEOT(eps=0.1, eot_iter=10, vote=4)
