"""Device names: resolved and checked before any work starts."""

import pytest
import torch

from iwmf_bench.devices import resolve_device
from iwmf_bench.errors import BenchError


def test_auto_and_canonical_names():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(" cpu ") == "cpu"
    # A suite may name GPUs that only its Ray workers have: syntax is checked, not presence.
    assert resolve_device("cuda:1", check_available=False) == "cuda:1"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", ""])
def test_unknown_devices_are_refused(name):
    with pytest.raises(BenchError, match="unknown device"):
        resolve_device(name)
    with pytest.raises(BenchError, match="unknown device"):
        resolve_device(name, check_available=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(BenchError, match=r"torch sees no CUDA GPU .*device: cpu in a suite"):
        resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_index_past_the_last_gpu():
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(BenchError, match=f"only {n} CUDA GPU"):
        resolve_device(f"cuda:{n}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_suite_on_a_missing_gpu_fails_before_any_cell(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = tmp_path / "smoke-cuda.yaml"
    config.write_text((root / "configs" / "smoke.yaml").read_text().replace("device: cpu", "device: cuda"))
    exe = Path(sys.executable).with_name("iwmf-bench")
    r = subprocess.run([str(exe), "run", "--all", "--config", str(config), "--results", str(tmp_path / "r"),
                        "--no-progress"], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 2 and "device 'cuda': torch sees no CUDA GPU" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()
