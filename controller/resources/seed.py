"""Writing a cloud-init NoCloud seed ISO (the files come from controller/cloudinit.py).

cloud-init finds the seed by its volume label `cidata` (cloud-init docs, "Datasource NoCloud").
The plain ISO 9660 names are 8.3 upper case, so the image also carries Rock Ridge (what Linux's
isofs reads first) and Joliet (what other systems read), both with the real lower-case names
`user-data`, `meta-data` and `network-config`; `genisoimage -volid cidata -joliet -rock` does
the same.

The ISO is replaced atomically: written to a temporary file in the same directory, fsynced, then
renamed over the target, so a QEMU that has the old file open keeps reading the old inode and a
crash never leaves a half-written seed under the real name. Sync code: the executor calls it
from a worker thread.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pycdlib

VOLUME_ID = "cidata"
ISO_MODE = 0o600
# Rock Ridge file mode: a regular file readable by all; the guest mounts the seed read-only.
RR_FILE_MODE = 0o100444
ISO_NAME_CHARS = 8


def write_seed_iso(path: Path, files: Mapping[str, bytes]) -> None:
    """Write `files` as an ISO 9660 image labelled `cidata` at `path`, replacing any old file.

    Idempotent: writing the same files again leaves an equivalent image.

    :raise ValueError: two file names that map to the same 8.3 ISO name, or an unusable name.
    :raise OSError: the directory is not writable, or the disk is full.
    """
    iso = build_iso(files)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            iso.write_fp(out)
            out.flush()
            os.fchmod(out.fileno(), ISO_MODE)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        iso.close()
    _fsync_dir(path.parent)  # make the rename itself durable


def build_iso(files: Mapping[str, bytes]) -> pycdlib.PyCdlib:
    """An in-memory image with each file under its ISO, Rock Ridge and Joliet names."""
    file_names = sorted(files)
    names = iso_names(file_names)  # first: a bad name raises before there is an image to close
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    for file_name, iso_name in zip(file_names, names, strict=True):
        body = files[file_name]
        iso.add_fp(
            io.BytesIO(body),
            len(body),
            iso_path=f"/{iso_name}.;1",
            rr_name=file_name,
            joliet_path=f"/{file_name}",
            file_mode=RR_FILE_MODE,
        )
    return iso


def iso_names(file_names: list[str]) -> list[str]:
    """Level-1 ISO 9660 names (at most 8 d-characters: A-Z, 0-9, _), one per file name, in order.

    :raise ValueError: two names collide, or a name is not a plain file name.
    """
    result = []
    for file_name in file_names:
        if not file_name or "/" in file_name or file_name.startswith("."):
            raise ValueError(f"{file_name!r} is not a plain file name")
        result.append(re.sub(r"[^A-Z0-9_]", "_", file_name.upper())[:ISO_NAME_CHARS])
    if len(set(result)) != len(result):
        raise ValueError(f"file names {file_names} collide as 8-character ISO 9660 names")
    return result


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_seed(path: Path, files: dict[str, bytes]) -> None:
    """Write this seed and remove older ones (their content is what the spec used to say)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_seed_iso(path, files)
    for old in path.parent.glob("cidata-*.iso"):
        if old != path:
            old.unlink(missing_ok=True)
