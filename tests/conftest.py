import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMGS = ROOT.parent / "shared" / "data" / "iwmfdiff-imgs"


@pytest.fixture(scope="session")
def shared_imgs() -> Path:
    if not SHARED_IMGS.is_dir():
        pytest.fail(f"shared test images not found at {SHARED_IMGS} (CI lays ../shared beside the clone)")
    return SHARED_IMGS


def align_shared_pairs(shared_imgs: Path, root: Path, model: str, pairs: int) -> dict[str, Path]:
    """The first ``pairs`` source and target images, aligned for ``model`` into ``root``;
    returns the aligned folder of each kind."""
    from iwmf_bench.align import align_folder

    out = {}
    for kind in ("source", "target"):
        raw = root / f"raw-{kind}"
        raw.mkdir()
        for path in sorted((shared_imgs / kind).iterdir())[:pairs]:
            shutil.copy(path, raw / path.name)
        out[kind] = root / kind
        assert align_folder(raw, out[kind], model=model) == 0
    return out


@pytest.fixture
def one_thread():
    """Tiny workloads (gradcheck, small UNets): with several intra-op threads on a busy
    machine each op waits on thread wake-ups, so run on one thread and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def paper_images_cached():
    """The shipped suites name the fetched image set ``paper-images``: make sure the cache
    holds it (scripts/setup.sh fetches it; a run of the tests alone takes it from ../shared)."""
    from iwmf_bench import image_sets
    from iwmf_bench.errors import BenchError

    try:
        image_sets.verified("paper-images")
    except BenchError:
        if SHARED_IMGS.is_dir():
            image_sets.fetch("paper-images", from_dir=SHARED_IMGS, progress=False)


def make_tarball(path: Path, members: dict[str, bytes]) -> Path:
    """A gzipped tarball holding ``members`` (name -> bytes), laid out as `npm pack` writes them."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def run_folder_suite(text: str, shared_imgs: Path, root: Path, name: str):
    """Write a suite (``text`` with ``{src}``/``{tgt}`` for the shared folders) under ``root``,
    run every cell into ``root/results`` and check they all finished; (config, suite,
    results folder, records)."""
    from iwmf_bench.runner import run_cells
    from iwmf_bench.suite import load_suite

    config = root / f"{name}.yaml"
    config.write_text(text.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    suite = load_suite(config)
    records = run_cells(suite.cells(), root / "results", progress=False)
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    return config, suite, root / "results", records


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by playwright (the site's and the docs' browser tests); the
    test is skipped where either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium not found (apt-get install chromium; scripts/setup.sh does it as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()
