"""What the attack benchmarks share: a small dlib-resnet suite written to a temporary
config and run as ordinary suite cells (cached under ``results``, keyed by their code, so a
rerun prints its table at once)."""

from __future__ import annotations

import datetime
import platform
import tempfile
from pathlib import Path

import torch

from iwmf_bench.runner import run_cells
from iwmf_bench.suite import check_data, load_suite

DEFENSES = {
    "iwmf-0.25": "{defense: iwmf, lambda_0: 0.25}",
    "iwmf-0.5": "{defense: iwmf, lambda_0: 0.5}",
    "random-resize-pad": "{defense: random-resize-pad}",
    "gaussian-0.12": "{defense: gaussian-noise, sigma: 0.12}",
    "tvm": "{defense: tvm, iterations: 50}",
}


def budgets(eps: list[float]) -> str:
    return "[" + ", ".join(f"{e:g}" for e in eps) + "]"


def run_suite(name: str, pairs: int, defenses: list[str], threats: dict[str, str], results: str) -> dict[str, dict]:
    """Run dlib-resnet x ``defenses`` x ``threats`` (label -> YAML flow mapping) on the
    paper's pairs, aligned, 10 evaluation draws; the records by cell name."""
    lines = [f"name: {name}", "seed: 0", "device: cpu",
             f"data: {{images: paper-images, align: true, pairs: {pairs}}}", "models: {dlib-resnet: {}}", "defenses:"]
    lines += [f"  {d}: {DEFENSES[d]}" for d in defenses]
    lines += ["threat_models:"] + [f"  {label}: {yaml}" for label, yaml in threats.items()]
    lines += ["evaluation: {draws: 10}"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        suite = load_suite(path)
        check_data(suite)
        return {r["name"]: r for r in run_cells(suite.cells(), results, progress=True)}


def label_at(threat: str, eps: float, all_eps: list[float]) -> str:
    """A sweep's cell label: the threat's own at its largest budget, ``LABEL@EPS`` below."""
    return threat if eps == max(all_eps) else f"{threat}@{eps:g}"


def machine_line() -> str:
    return (f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads")
