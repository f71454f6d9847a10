"""Square's two settings that decide its depth (``p_init``, ``stop_on_success``), and the
benchmark that compares them (benchmarks/square_settings.py)."""

import importlib.util
from pathlib import Path

import torch

from iwmf_bench import metrics
from iwmf_bench.attacks.base import AttackTask
from iwmf_bench.attacks.square import Square
from test_attacks import TinyFace, images

ROOT = Path(__file__).resolve().parents[1]


def _pairs(model):
    src, tgt = images(4, seed=1), images(4, seed=2)
    with torch.no_grad():
        refs = model.embed(tgt)
    return src, refs


def _margin(model, x, refs):
    with torch.no_grad():
        return metrics.margin(metrics.scores(model.embed(x), refs, "cosine"), model.threshold, "cosine")


def test_options_are_named_and_recorded():
    attack = Square(eps=0.03, queries=10, p_init=0.8, stop_on_success=False)
    config = attack.config()
    assert config["p_init"] == 0.8 and config["stop_on_success"] is False


def test_without_stop_every_image_keeps_raising_its_margin():
    # Accepted at the initial point: with stop on success the search ends there; without
    # it, the same start is pushed for the whole budget, and the margin only grows.
    easy = TinyFace(threshold=-1.5)
    src, refs = _pairs(easy)
    stop = Square(eps=0.03, queries=60, p_init=0.8, stop_on_success=True).run(AttackTask(easy, src, refs, seed=0))
    deep = Square(eps=0.03, queries=60, p_init=0.8, stop_on_success=False).run(AttackTask(easy, src, refs, seed=0))
    assert torch.equal(stop.queries, torch.ones(4, dtype=torch.long))
    assert torch.equal(deep.queries, torch.full((4,), 60)) and deep.success.all()
    before, after = _margin(easy, stop.adversarial, refs), _margin(easy, deep.adversarial, refs)
    assert torch.all(after >= before - 1e-6) and torch.any(after > before + 1e-4)
    assert torch.all(deep.info["objective"] >= stop.info["objective"])


def test_benchmark_compares_the_four_combinations():
    spec = importlib.util.spec_from_file_location("square_settings", ROOT / "benchmarks" / "square_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = {(o["p_init"], o["stop_on_success"]) for _, o in module.SETTINGS.values()}
    assert grid == {(0.05, True), (0.8, True), (0.05, False), (0.8, False)}
    for _, options in module.SETTINGS.values():  # each is a valid Square
        Square(eps=0.03, queries=10, **options)
