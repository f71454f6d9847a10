"""What a wheel install gets: the package data (diffusion priors) and the entry points of
every built-in, so users who `pip install iwmf-bench` see what a checkout sees."""

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from iwmf_bench import registry
from iwmf_bench.defenses.diffusion_prior import load_prior_config

ROOT = Path(__file__).resolve().parents[1]


def test_configs_diffusion_is_the_shipped_priors():
    shipped = sorted(p.name for p in (ROOT / "iwmf_bench" / "priors").glob("*.yaml"))
    assert shipped == ["celeba_hq.yaml", "cifar10.yaml", "imagenet_256.yaml", "tiny.yaml", "tiny_adm.yaml"]
    assert sorted(p.name for p in (ROOT / "configs" / "diffusion").glob("*.yaml")) == shipped
    for name in shipped:
        assert load_prior_config(ROOT / "configs" / "diffusion" / name) == load_prior_config(Path(name).stem)


def test_wheel_ships_priors_and_entry_points(tmp_path):
    source = tmp_path / "src"  # build from a copy: no build/ or egg-info left in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "iwmf_bench", source / "iwmf_bench", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("configs", "imgs"):  # the shipped suites and dataset manifests
        shutil.copytree(ROOT / folder, source / folder, symlinks=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("iwmf_bench-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (ep_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(ep_name).decode())
    assert {f"iwmf_bench/priors/{p}.yaml" for p in ("celeba_hq", "cifar10", "imagenet_256", "tiny", "tiny_adm")} <= names
    assert entry_points["console_scripts"]["iwmf-bench"] == "iwmf_bench.cli:main"
    # The suites travel with the package (`--config smoke` after a wheel install), and so do
    # the manifests the image sets are checked against.
    assert {f"iwmf_bench/suites/{s}.yaml" for s in ("default", "smoke", "extended", "paper")} <= names
    assert "iwmf_bench/manifests/paper-images.json" in names
    assert not any(n.endswith(".png") for n in names)  # imgs/ figures stay out of the wheel
    for group in ("defenses", "models", "attacks", "datasets"):
        # the plugin test may have installed extra names; every built-in must be in the wheel
        built_in = {n for n, e in registry.available(group).items() if e.distribution == "iwmf-bench"}
        assert built_in == set(entry_points[f"iwmf_bench.{group}"]), group


def test_explicit_package_list_names_every_package():
    """pyproject.toml lists the packages by hand (to map configs/ and imgs/ into the wheel):
    a new subpackage must be added there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "iwmf_bench").rglob("__init__.py")}
    assert found <= listed and listed - found == {"iwmf_bench.suites", "iwmf_bench.manifests"}
