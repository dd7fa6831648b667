"""Artifact folders (DESIGN.md section 7): model files + ``report.json`` + a versioned
``manifest.json`` with every file's sha256. Written into a temporary folder beside the target
and renamed at the end, so a failure never leaves partial output; read back only after every
hash matches (an artifact may contain code, and running it runs that code)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from effc.errors import InputError, OutputError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")


def write_artifact(
    out: str | Path,
    build: Callable[[Path], None],
    manifest: dict,
    force: bool = False,
) -> Path:
    """Create ``out`` atomically: ``build(tmp)`` writes the files, then the manifest is added."""
    out = Path(out)
    prepare_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    backup = None
    try:
        try:
            build(tmp)
        except OSError as e:  # disk full, permissions: the output cannot be written
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = dict(manifest, manifest_version=MANIFEST_VERSION)
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in files
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a folder's usual permissions, not the temp folder's 0700
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and not out.exists():
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return out


def read_manifest(folder: str | Path) -> dict:
    """Validate an artifact folder against its manifest and return the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not an artifact folder (expected the output of effc compile)"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} has no {MANIFEST}; it is not an effc artifact")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from e
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise InputError(
            f"{path}: manifest version {version!r} is not supported (expected {MANIFEST_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InputError(f"{path}: the manifest lists no files")
    root = folder.resolve()
    for name, info in files.items():
        target = (folder / name).resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or root not in target.parents:
            raise InputError(f"{path}: file {name!r} lies outside the artifact folder")
        if not target.is_file():
            raise InputError(f"artifact file {name} is missing from {folder}")
        if sha256(target) != info.get("sha256"):
            raise InputError(
                f"artifact file {name} does not match its sha256 in the manifest (modified or corrupt)"
            )
    return manifest
