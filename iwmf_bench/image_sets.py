"""Fetchable image sets: images the benchmark uses but must not commit, pinned by hash.

The paper's 20 + 20 demo faces (``paper-images``) live in its public repository, which
carries no licence: we may not redistribute them, so the project commits only a manifest
(``imgs/NAME.json``: the repository, the commit, a ``base_url`` and every file's relative
path, size and sha256) and fetches the files at run time, from the pinned commit or from
a local copy (``iwmf-bench fetch NAME --from DIR``). Either way every file is checked
against the manifest before it enters the cache, so a suite that names ``images: NAME``
reads the same bytes on every machine.

Files are cached under ``$IWMF_BENCH_HOME/datasets/NAME/`` at the manifest's relative paths
(``.../paper-images/source/00000_25.png``). A set enters the cache whole or not at all: it
is assembled and checked in a temporary folder beside its destination, then swapped in
with ``os.replace``; a refused download or ``--from`` folder leaves the cache as it was.

Messages name relative paths and commands, never a path of this machine: the missing-set
reason is written into committed leaderboards.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import BenchError, DatasetMissingError
from .weights_cache import home, sha256_of

# Where manifests are found, in order: inside an installed wheel (packaged as
# iwmf_bench/manifests), then the source checkout's imgs/.
MANIFEST_DIRS = (Path(__file__).parent / "manifests", Path(__file__).resolve().parents[1] / "imgs")
# Suffixes of files that would pass for images of a set: an extra one in a --from folder
# means the folder is not the set the manifest describes.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class ImageSet:
    name: str
    description: str
    repository: str
    commit: str
    base_url: str
    files: tuple[tuple[str, int, str], ...]  # (relative path, size in bytes, sha256)

    @property
    def folders(self) -> list[str]:
        """The set's top-level folders (``source``, ``target``), for messages."""
        return sorted({path.split("/")[0] for path, _, _ in self.files})


def _is_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "files" in data and "base_url" in data


def known() -> list[str]:
    """Names of the image sets whose manifests are found (wheel or checkout)."""
    return sorted({p.stem for d in MANIFEST_DIRS if d.is_dir() for p in d.glob("*.json") if _is_manifest(p)})


def manifest_path(name: str) -> Path:
    for folder in MANIFEST_DIRS:
        path = folder / f"{name}.json"
        if path.is_file():
            return path
    raise BenchError(f"unknown image set {name!r}; known: {', '.join(known()) or 'none'}")


def image_set(name: str) -> ImageSet:
    data = json.loads(manifest_path(name).read_text())
    return ImageSet(name=data["name"], description=data["description"], repository=data["repository"],
                    commit=data["commit"], base_url=data["base_url"],
                    files=tuple((f["path"], int(f["size"]), f["sha256"]) for f in data["files"]))


def folder(name: str) -> Path:
    """Where ``name`` is cached (no checks)."""
    return home() / "datasets" / name


def fetch_hint(s: ImageSet) -> str:
    return (f"run `iwmf-bench fetch {s.name}` (downloads from the pinned commit) or "
            f"`iwmf-bench fetch {s.name} --from DIR` (a local copy holding {' and '.join(f + '/' for f in s.folders)})")


def _few(paths: list[str], at_most: int = 3) -> str:
    return ", ".join(paths[:at_most]) + (f" (+{len(paths) - at_most} more)" if len(paths) > at_most else "")


def _problems(s: ImageSet, root: Path) -> tuple[list[str], list[str]]:
    """(missing, altered) relative paths of ``s``'s files under ``root``, by size and sha256."""
    missing, altered = [], []
    for path, size, sha256 in s.files:
        file = root / path
        if not file.is_file():
            missing.append(path)
        elif file.stat().st_size != size or sha256_of(file) != sha256:
            altered.append(path)
    return missing, altered


# Verified sets of this process: the (path, mtime_ns, size, expected sha256) of every file.
# A file rewritten since changes its mtime or size, so a hit means the same bytes were hashed.
_VERIFIED: set[tuple] = set()


def _stat_key(s: ImageSet, root: Path) -> tuple | None:
    key = []
    for path, _, sha256 in s.files:
        try:
            st = (root / path).stat()
        except OSError:
            return None
        key.append((str(root / path), st.st_mtime_ns, st.st_size, sha256))
    return tuple(key)


def verified(name: str) -> Path:
    """The cache folder of ``name`` once every manifest file is present with its sha256.

    A missing or incomplete set, or an altered file, raises :class:`DatasetMissingError`
    on one line naming the fetch commands (and the file, for an altered one).
    """
    s = image_set(name)
    root = folder(name)
    key = _stat_key(s, root)
    if key is not None and key in _VERIFIED:
        return root
    missing, altered = _problems(s, root)
    if len(missing) == len(s.files):
        raise DatasetMissingError(f"image set {name!r} is not in the cache; {fetch_hint(s)}")
    if missing:
        raise DatasetMissingError(f"image set {name!r} is incomplete in the cache ({len(missing)} of {len(s.files)} "
                                  f"files missing: {_few(missing)}); {fetch_hint(s)}")
    if altered:
        raise DatasetMissingError(f"image set {name!r}: cached file {_few(altered)} does not match the manifest's "
                                  f"sha256 (corrupt or altered); {fetch_hint(s)}")
    _VERIFIED.add(_stat_key(s, root))
    return root


def is_cached(name: str) -> bool:
    try:
        verified(name)
    except DatasetMissingError:
        return False
    return True


def _swap_in(tmp: Path, dest: Path) -> None:
    """Put the checked folder ``tmp`` at ``dest``: the old folder is renamed aside first (a
    folder cannot be replaced while it holds files), so ``dest`` is never half written."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old)


def _download(s: ImageSet, tmp: Path, progress: bool, timeout: float) -> None:
    for path, size, sha256 in tqdm(s.files, desc=s.name, unit="file", disable=not progress):
        url = s.base_url + path
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                data = resp.read(size + 1)  # one byte more than the manifest's size shows a longer file
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise BenchError(f"could not download {s.name!r} ({path}: {getattr(exc, 'reason', exc)}); this machine "
                             f"may be offline: copy {' and '.join(f + '/' for f in s.folders)} from elsewhere and run "
                             f"`iwmf-bench fetch {s.name} --from DIR`") from None
        file = tmp / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        if len(data) != size or sha256_of(file) != sha256:
            raise BenchError(f"downloaded {path} of {s.name!r} does not match the manifest ({len(data)} bytes, "
                             f"expected {size}, or a different sha256); refused, the cache is unchanged; "
                             f"try again or use `iwmf-bench fetch {s.name} --from DIR`")


def _check_dir(s: ImageSet, src: Path) -> None:
    """``src`` holds exactly the set's images at their relative paths, each with its hash."""
    if not src.is_dir():
        raise BenchError(f"--from {src}: no such folder (a copy holding {' and '.join(f + '/' for f in s.folders)})")
    missing, altered = _problems(s, src)
    listed = {path for path, _, _ in s.files}
    extra = sorted(p.relative_to(src).as_posix() for f in s.folders if (src / f).is_dir()
                   for p in (src / f).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.relative_to(src).as_posix() not in listed)
    wrong = [f"{what}: {_few(paths)}" for what, paths in
             (("missing", missing), ("sha256 differs", altered), ("unknown images", extra)) if paths]
    if wrong:
        raise BenchError(f"--from {src}: not the {s.name!r} of the manifest ({'; '.join(wrong)}); "
                         f"refused, the cache is unchanged")


def fetch(name: str, from_dir: str | os.PathLike | None = None, progress: bool = True,
          timeout: float = 30) -> tuple[Path, str]:
    """Put image set ``name`` into the cache, checked; return its folder and what happened.

    Without ``from_dir``, a verified cache is left as it is; otherwise every file is
    downloaded from the manifest's ``base_url``. With ``from_dir`` (a local copy), that
    folder is checked whole before the cache is touched, then copied in.
    """
    s = image_set(name)
    dest = folder(name)
    was_cached = is_cached(name)
    if from_dir is None and was_cached:
        return dest, "already cached, verified"
    if from_dir is not None:
        src = Path(from_dir).expanduser()
        _check_dir(s, src)
        if was_cached:  # both match every manifest hash: the same bytes
            return dest, "identical to the cached copy, verified"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes the cache folder
    try:
        if from_dir is None:
            _download(s, tmp, progress, timeout)
        else:
            for path, _, _ in s.files:
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / path, tmp / path)
            if any(_problems(s, tmp)):  # the copy itself, before it replaces anything
                raise BenchError(f"--from {src}: the copy into the cache did not match the manifest; "
                                 f"refused, the cache is unchanged")
        replaced = dest.exists()
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verified(name)
    n = len(s.files)
    return dest, f"replaced the cached copy ({n} files verified)" if replaced else f"fetched ({n} files verified)"
