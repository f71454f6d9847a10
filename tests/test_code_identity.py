"""Results tied to the code that made them: fingerprints of normalized source, and cell
keys that change when, and only when, the code a cell runs changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iwmf_bench import code_identity

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def demo_package(tmp_path, monkeypatch):
    """A two-module package on sys.path: ``fpdemo.top`` imports ``fpdemo.helper``."""
    pkg = tmp_path / "fpdemo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("SCALE = 2\n\ndef scale(x):\n    return SCALE * x\n")
    (pkg / "top.py").write_text(textwrap.dedent('''\
        """Top module."""
        import math
        from .helper import scale


        def f(x):
            """Docstring."""
            return scale(x) + math.pi
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m.split(".")[0] == "fpdemo"]:
        del sys.modules[name]  # finding a submodule imported the package from this test's folder


def test_comments_docstrings_and_formatting_do_not_count_behaviour_does(demo_package):
    top = demo_package / "top.py"
    before = code_identity.fingerprint("fpdemo.top")
    assert set(code_identity.closure_digests("fpdemo.top")) == {"fpdemo.top", "fpdemo.helper"}  # not math
    top.write_text(textwrap.dedent('''\
        """Top module, reworded; and a second paragraph."""
        import math  # a comment
        from .helper import (
            scale,
        )

        def f(x):  # another comment
            """Another docstring."""

            return (scale(x)
                    + math.pi)
        '''))
    assert code_identity.fingerprint("fpdemo.top") == before
    top.write_text(top.read_text().replace("+ math.pi", "- math.pi"))
    changed = code_identity.fingerprint("fpdemo.top")
    assert changed != before
    # a module it imports is part of it; the helper's own fingerprint does not see the top
    helper_before = code_identity.fingerprint("fpdemo.helper")
    (demo_package / "helper.py").write_text("SCALE = 3\n\ndef scale(x):\n    return SCALE * x\n")
    assert code_identity.fingerprint("fpdemo.top") != changed
    assert code_identity.fingerprint("fpdemo.helper") != helper_before


def test_a_docstring_only_body_stays_valid_and_a_string_constant_counts(demo_package):
    helper = demo_package / "helper.py"
    helper.write_text('def g():\n    """Only a docstring."""\n')
    empty = code_identity.fingerprint("fpdemo.helper")
    helper.write_text('def g():\n    """Other words."""\n')
    assert code_identity.fingerprint("fpdemo.helper") == empty
    helper.write_text('def g():\n    return "a"\n')
    a = code_identity.fingerprint("fpdemo.helper")
    helper.write_text('def g():\n    return "b"\n')
    assert a != code_identity.fingerprint("fpdemo.helper") != empty


KEYS = """
import json, sys
from iwmf_bench.suite import load_suite
print(json.dumps({c.name: c.key for c in load_suite(sys.argv[1]).cells()}))
"""


def _keys(src: Path, config: Path = SMOKE, extra_path: str = "") -> dict[str, str]:
    """Cell keys of a suite computed by the iwmf_bench copy under ``src`` (a fresh process)."""
    path = os.pathsep.join(p for p in (str(src), extra_path) if p)
    r = subprocess.run([sys.executable, "-c", KEYS, str(config)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": path}, cwd=src)  # not the checkout: '' leads sys.path
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "iwmf_bench", src / "iwmf_bench", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "imgs").mkdir()
    for manifest in (ROOT / "imgs").glob("*.json"):  # the image sets' manifests, found beside the package
        shutil.copy(manifest, src / "imgs")
    return src


def _edit(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert text.count(old) >= 1, (path, old)
    path.write_text(text.replace(old, new, 1))
    return text


def test_keys_move_with_exactly_the_code_each_cell_runs(package_copy):
    """One behavioural line in one defense: that defense's cells only; a comment or a
    docstring: nothing; scoring: every cell."""
    base = _keys(package_copy)
    assert base == _keys(ROOT)  # the copy is the package, key for key
    jpeg = package_copy / "iwmf_bench" / "defenses" / "jpeg.py"
    original = _edit(jpeg, "def check_quality(quality) -> int:",
                     "# a new comment\ndef check_quality(quality) -> int:\n    \"\"\"A new docstring.\"\"\"")
    assert _keys(package_copy) == base
    jpeg.write_text(original)
    _edit(jpeg, "return int(quality)", "return int(quality) + 0")  # same numbers, other code
    moved = {name for name, key in _keys(package_copy).items() if key != base[name]}
    jpeg.write_text(original)
    assert moved == {name for name in base if name.split("/")[1] == "jpeg-50"} and moved
    score = package_copy / "iwmf_bench" / "pipeline" / "score.py"
    original = _edit(score, "n_draws = cell.draws", "n_draws = cell.draws + 0")
    try:
        now = _keys(package_copy)
    finally:
        score.write_text(original)
    assert all(now[name] != key for name, key in base.items())


def _plugin(site: Path, body: str) -> None:
    """A one-module third-party plugin, registered through a hand-written dist-info."""
    (site / "fpplugin.py").write_text(body)
    info = site / "fpplugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fpplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[iwmf_bench.defenses]\nfp-blur = fpplugin:Blur\n")


PLUGIN = '''
import torch
from iwmf_bench.defenses.base import Defense


class Blur(Defense):
    """A 3x3 box blur (a test plugin)."""

    def purify(self, x, generator=None):
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
'''


def test_a_third_party_plugins_change_moves_its_own_cells(package_copy, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _plugin(site, PLUGIN)
    config = tmp_path / "plugin.yaml"
    config.write_text(SMOKE.read_text().replace("jpeg-50: {defense: jpeg, quality: 50}", "blur: {defense: fp-blur}"))
    base = _keys(package_copy, config, str(site))
    _plugin(site, PLUGIN.replace("stride=1, padding=1", "stride=1, padding=1, ceil_mode=False"))
    moved = {name for name, key in _keys(package_copy, config, str(site)).items() if key != base[name]}
    assert moved == {name for name in base if name.split("/")[1] == "blur"} and moved


CLI = "import sys; from iwmf_bench.cli import main; sys.exit(main())"


def _provenance(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "leaderboard", "check", "--provenance", "--config", str(SMOKE),
                           "--leaderboards", str(ROOT / "leaderboards" / "smoke")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(src)}, cwd=src)


def test_provenance_check_passes_on_the_committed_leaderboards_and_names_stale_cells(package_copy):
    ok = _provenance(package_copy)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "provenance check passed" in ok.stdout
    jpeg = package_copy / "iwmf_bench" / "defenses" / "jpeg.py"
    original = _edit(jpeg, "return int(quality)", "return int(quality) + 0")
    try:
        stale = _provenance(package_copy)
    finally:
        jpeg.write_text(original)
    assert stale.returncode == 2
    lines = [x for x in stale.stderr.splitlines() if x.startswith("leaderboard check --provenance:")]
    named = {x.split(": ")[1] for x in lines}
    committed = {json.loads(p.read_text())["name"] for p in (ROOT / "leaderboards" / "smoke" / "cells").glob("*.json")}
    assert named == {n for n in committed if n.split("/")[1] == "jpeg-50"} and named
    assert all("code changed: defense (" in x for x in lines)
    assert any(n.endswith("@equal-utility") for n in named)  # a re-crafted cell is checked like the others
    assert f"iwmf-bench: error: provenance check failed for smoke: {len(named)} committed cell(s)" in stale.stderr


@pytest.mark.parametrize("suite", sorted(p.name for p in (ROOT / "leaderboards").iterdir() if (p / "cells").is_dir()))
def test_every_committed_leaderboard_was_computed_by_the_current_code(suite):
    """CI's provenance check of every committed suite: no committed cell may come from code
    (or config) other than this checkout's; the cells re-crafted at equal utility included."""
    from iwmf_bench.leaderboard import committed_suite_cells, provenance
    from iwmf_bench.suite import find_suite, load_suite

    committed = ROOT / "leaderboards" / suite
    assert provenance(committed_suite_cells(load_suite(find_suite(suite)), committed), committed) == []


RUN_SUITE = """\
name: rerun
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 3}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  jpeg: {{defense: jpeg, quality: 50}}
  median: {{defense: median, k: 3}}
threat_models:
  clean: {{attack: null}}
  apgd: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.03, steps: 2}}
evaluation: {{draws: 2}}
"""


def _run(src: Path, config: Path, out: Path, suite: str = "rerun") -> dict[str, dict]:
    r = subprocess.run([sys.executable, "-c", CLI, "run", "--all", "--config", str(config), "--results",
                        str(out / "results"), "--leaderboards", str(out / "lb"), "--imgs", str(out / "imgs"),
                        "--no-progress"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(src)}, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    return {p.name: json.loads(p.read_text()) for p in (out / "results" / suite).glob("*.json")}


def test_rerun_after_a_defense_change_recomputes_exactly_its_cells(package_copy, shared_imgs, tmp_path):
    config = tmp_path / "rerun.yaml"
    config.write_text(RUN_SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    first = _run(package_copy, config, tmp_path)
    assert len(first) == 6
    jpeg = package_copy / "iwmf_bench" / "defenses" / "jpeg.py"
    original = _edit(jpeg, "return int(quality)", "return int(quality) + 0")
    try:
        second = _run(package_copy, config, tmp_path)
    finally:
        jpeg.write_text(original)
    new = {name: r for name, r in second.items() if name not in first}
    assert sorted(r["name"] for r in new.values()) == ["dlib-resnet/jpeg/apgd", "dlib-resnet/jpeg/clean"]
    # the others were served from the cache: the same files, untouched
    assert all(second[name]["started"] == r["started"] for name, r in first.items())
    # and the recomputed cells record the defense's new fingerprint, the rest unchanged
    old_jpeg = next(r for r in first.values() if r["name"] == "dlib-resnet/jpeg/clean")
    new_jpeg = next(r for r in new.values() if r["name"] == "dlib-resnet/jpeg/clean")
    assert new_jpeg["code"]["defense"] != old_jpeg["code"]["defense"]
    assert new_jpeg["code"]["pipeline"] == old_jpeg["code"]["pipeline"]


# --- data files: what code reads besides code --------------------------------------------

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # inert until a test sets _OPENED


def _defense_options(name: str) -> dict:
    return {"config": "tiny", "pretrained": False, "timesteps": 2} if name in ("diffpure", "iwmfdiff") else {}


@pytest.mark.parametrize("name", sorted(__import__("iwmf_bench.registry", fromlist=["x"]).available("defenses")))
def test_every_package_file_a_defense_reads_is_declared_in_its_fingerprint(name):
    """Building a defense and purifying with it may read files of the package other than
    code only where its ``data_files`` declares them (so the cell key hashes them): this
    fails when a module opens a package file no fingerprint covers."""
    global _OPENED
    import torch

    from iwmf_bench import registry

    options = _defense_options(name)
    factory = registry.get("defenses", name).factory
    _OPENED = []
    try:
        defense = factory(**options)
        defense.purify(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
                       torch.Generator().manual_seed(1))
    finally:
        opened, _OPENED = _OPENED, None
    package = (ROOT / "iwmf_bench").resolve()
    data = {Path(p).resolve() for p in opened
            if Path(p).resolve().is_relative_to(package) and "__pycache__" not in Path(p).parts
            and Path(p).suffix not in (".py", ".pyc")}
    declared = {Path(p).resolve() for p in getattr(factory, "data_files", lambda o: [])(options)}
    assert data <= declared, f"{name} read {sorted(map(str, data - declared))} without declaring them (data_files)"
    if name in ("diffpure", "iwmfdiff"):
        assert data == declared == {package / "priors" / "tiny.yaml"}


PRIOR_SUITE = """\
name: priors
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 2}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  tiny: {{defense: diffpure, config: tiny, pretrained: false, timesteps: 2, sigma_y: 0.05}}
  other: {{defense: diffpure, config: tiny2, pretrained: false, timesteps: 2, sigma_y: 0.05}}
threat_models:
  clean: {{attack: null}}
evaluation: {{draws: 2}}
"""


def test_editing_a_prior_recomputes_the_cells_that_use_it_and_nothing_else(package_copy, shared_imgs, tmp_path):
    """A prior's YAML is data the code reads: editing it (in a scratch copy of the package)
    moves the keys of the cells whose defense uses that prior, and a rerun recomputes those
    and serves every other cell from the cache."""
    priors = package_copy / "iwmf_bench" / "priors"
    shutil.copy(priors / "tiny.yaml", priors / "tiny2.yaml")
    config = tmp_path / "priors.yaml"
    config.write_text(PRIOR_SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    try:
        first = _run(package_copy, config, tmp_path, suite="priors")
        assert sorted(r["name"] for r in first.values()) == ["dlib-resnet/none/clean", "dlib-resnet/other/clean",
                                                               "dlib-resnet/tiny/clean"]
        original = _edit(priors / "tiny.yaml", "beta_end: 0.02", "beta_end: 0.021")
        try:
            second = _run(package_copy, config, tmp_path, suite="priors")
        finally:
            (priors / "tiny.yaml").write_text(original)
    finally:
        (priors / "tiny2.yaml").unlink()
    new = {name: r for name, r in second.items() if name not in first}
    assert [r["name"] for r in new.values()] == ["dlib-resnet/tiny/clean"]
    assert all(second[name]["started"] == r["started"] for name, r in first.items())
    old = next(r for r in first.values() if r["name"] == "dlib-resnet/tiny/clean")
    now = next(iter(new.values()))
    assert now["code"]["defense_data"] != old["code"]["defense_data"]
    assert now["code"]["defense"] == old["code"]["defense"] and now["code"]["pipeline"] == old["code"]["pipeline"]
