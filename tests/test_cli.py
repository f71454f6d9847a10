"""The command line, run as a user runs it (subprocess, installed console script)."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import iwmf_bench


def cli(*args, cwd=None):
    exe = Path(sys.executable).with_name("iwmf-bench")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_version_and_list():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"iwmf-bench {iwmf_bench.__version__}"
    r = cli("list")
    assert r.returncode == 0
    assert "iwmf " in r.stdout and "Iterative Window Mean Filter" in r.stdout and "none " in r.stdout


def test_purify_writes_same_names_and_is_reproducible(shared_imgs, tmp_path):
    args = ["purify", "--defense", "iwmf", "--lambda-0", "0.25", "--input", shared_imgs / "source"]
    r1 = cli(*args, "--seed", "0", "--output", tmp_path / "a")
    assert r1.returncode == 0, r1.stderr
    assert "s/image" in r1.stdout
    files = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in files] == sorted(p.with_suffix(".png").name for p in (shared_imgs / "source").iterdir())
    assert len(files) == 20 and all(Image.open(p).size == (160, 160) for p in files)
    assert cli(*args, "--seed", "0", "--output", tmp_path / "b").returncode == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    r3 = cli(*args, "--seed", "1", "--output", tmp_path / "c")
    assert r3.returncode == 0 and digest(tmp_path / "c") != digest(tmp_path / "a")
    # The filter really changed the images, and not beyond recognition.
    a = np.asarray(Image.open(files[0]), dtype=float)
    src = np.asarray(Image.open(shared_imgs / "source" / "00000_25.png").convert("RGB"), dtype=float)
    assert 1.0 < np.abs(a - src).mean() < 40.0


def test_bad_input_exits_2_with_one_line(shared_imgs, tmp_path):
    for case in ("corrupt", "misnamed"):
        folder = tmp_path / case
        shutil.copytree(shared_imgs / "target", folder)
        if case == "corrupt":
            (folder / "00003_0.jpg").write_bytes((folder / "00003_0.jpg").read_bytes()[:300])
            bad = "00003_0.jpg"
        else:
            (folder / "00003_0.jpg").rename(folder / "image3.jpg")
            bad = "image3.jpg"
        r = cli("purify", "--defense", "iwmf", "--lambda-0", "0.25", "--input", folder, "--output", tmp_path / "o")
        assert r.returncode == 2
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("iwmf-bench: error:") and bad in lines[0]
        assert "Traceback" not in r.stderr


def test_decompression_bomb_exits_2_with_one_line(tmp_path):
    from test_data_metrics import png_claiming_size

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "00000_1.png")
    png_claiming_size(folder / "00001_1.png", 20000, 20000)  # 400 megapixels claimed, 66 bytes on disk
    r = cli("purify", "--defense", "iwmf", "--input", folder, "--output", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("iwmf-bench: error:")
    assert "00001_1.png" in lines[0] and "too large" in lines[0] and "downscale" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_defense_is_a_clean_error(tmp_path, shared_imgs):
    r = cli("purify", "--defense", "nope", "--input", shared_imgs / "source", "--output", tmp_path)
    assert r.returncode == 2 and "unknown defense 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_align_then_eval_separates_identities(shared_imgs, tmp_path):
    # The user's path: align both folders with the CLI, then evaluate dlib-resnet on them.
    for part in ("source", "target"):
        r = cli("align", "--model", "dlib-resnet", "--input", shared_imgs / part, "--output", tmp_path / part)
        assert r.returncode == 0, r.stderr
    assert all(Image.open(p).size == (150, 150) for p in (tmp_path / "source").iterdir())
    both = tmp_path / "both"
    both.mkdir()
    for p in [*(tmp_path / "source").iterdir(), *(tmp_path / "target").iterdir()]:
        stem_id, label = p.stem.split("_")
        offset = 100 if p.parent.name == "target" else 0  # keep ids unique across the two folders
        shutil.copy(p, both / f"{int(stem_id) + offset:05d}_{label}.png")
    r = cli("eval", "--model", "dlib-resnet", "--input", both, "--references", both, "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    # 40 images, 4 identities of 10: 180 genuine and 600 impostor unordered pairs.
    assert out["far"]["n"] == 600 and out["frr"]["n"] == 180
    correct = (out["far"]["n"] - out["far"]["k"]) + (out["frr"]["n"] - out["frr"]["k"])
    assert correct / 780 >= 0.95


def test_eval_without_weights_names_the_fetch_command(shared_imgs, tmp_path):
    env_home = tmp_path / "home"
    import os

    r = subprocess.run([str(Path(sys.executable).with_name("iwmf-bench")), "eval", "--model", "facenet",
                        "--input", str(shared_imgs / "source"), "--references", str(shared_imgs / "target")],
                       capture_output=True, text=True, env={**os.environ, "IWMF_BENCH_HOME": str(env_home)},
                       timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "iwmf-bench fetch facenet" in lines[0] and "20180402-114759-vggface2.pt" in lines[0]
    assert str(env_home) not in lines[0]  # the reason lands in leaderboards: no machine path


def test_defense_options_reach_the_defense(shared_imgs, tmp_path):
    # Any keyword of the defense through -D KEY=VALUE (YAML values): here the tiny random
    # UNet, which runs the whole IWMF-Diff pipeline offline.
    base = ["purify", "--defense", "iwmfdiff", "--sigma-y", "0.1", "-D", "config=tiny", "-D", "pretrained=false",
            "--input", shared_imgs / "source"]
    runs = {}
    for name, extra in (("a", ["-D", "timesteps=4"]), ("b", ["-D", "timesteps=4"]), ("c", ["-D", "timesteps=2"])):
        r = cli(*base, *extra, "--output", tmp_path / name)
        assert r.returncode == 0, r.stderr
        runs[name] = digest(tmp_path / name)
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]  # seeded, and timesteps took effect
    assert len(runs["a"]) == 20
    r = cli(*base, "-D", "timestep=4", "--output", tmp_path / "d")
    assert r.returncode == 2 and "does not take 'timestep'" in r.stderr and "timesteps" in r.stderr
    r = cli(*base, "-D", "timesteps", "--output", tmp_path / "d")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "Traceback" not in r.stderr


def test_bad_or_missing_device_is_one_clean_line(shared_imgs, tmp_path):
    import torch

    cases = {"gpu": "unknown device 'gpu'", "meta": "unknown device 'meta'"}
    if not torch.cuda.is_available():
        cases["cuda"] = "torch sees no CUDA GPU"
    for device, message in cases.items():
        r = cli("purify", "--defense", "iwmf", "--device", device, "--input", shared_imgs / "source",
                "--output", tmp_path / device)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert not (tmp_path / device).exists()


def test_output_folder_that_is_an_input_is_refused(shared_imgs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(shared_imgs / "source", src)
    before = digest(src)
    for args in (("purify", "--defense", "iwmf", "--input", src, "--output", src),
                 ("purify", "--defense", "iwmf", "--input", src, "--output", tmp_path / "." / "src"),
                 ("attack", "--attack", "apgd", "--model", "dlib-resnet", "--sources", src,
                  "--targets", shared_imgs / "target", "--output", src),
                 ("align", "--model", "dlib-resnet", "--input", src, "--output", src)):
        r = cli(*args)
        assert r.returncode == 2 and "the output folder is the input folder" in r.stderr, r.stderr
    assert digest(src) == before  # nothing was overwritten
