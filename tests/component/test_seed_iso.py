"""The seed ISO on disk: labelled `cidata`, files readable byte for byte under their real names."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pycdlib
import pytest

from api.types import CloudInitSpec
from controller.cloudinit import seed_files
from controller.resources.seed import write_seed_iso

UID = "6f1c1d1e-4c5b-4d59-9f40-0d4b0a6c1e11"
USER_DATA = "#!/bin/sh\n# héllo ✓ \"quotes\" 'single' $HOME \\ back\r\ntab\there\n\n--- no final newline"
NETWORK_CONFIG = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}

IsoOpener = Callable[[Path | BinaryIO], pycdlib.PyCdlib]


@pytest.fixture
def files() -> dict[str, bytes]:
    spec = CloudInitSpec.model_validate({"userData": USER_DATA, "networkConfig": NETWORK_CONFIG})
    return seed_files(spec, uid=UID, name="web")


@pytest.fixture
def open_iso() -> Iterator[IsoOpener]:
    """`open_iso(path or file)` reads an image with pycdlib; every image opened is closed at teardown."""
    opened: list[pycdlib.PyCdlib] = []

    def open_iso(source: Path | BinaryIO) -> pycdlib.PyCdlib:
        iso = pycdlib.PyCdlib()
        if isinstance(source, Path):
            iso.open(str(source))
        else:
            iso.open_fp(source)
        opened.append(iso)
        return iso

    yield open_iso
    for iso in opened:
        iso.close()


def extract(iso: pycdlib.PyCdlib, **where: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **where)
    return out.getvalue()


def test_volume_is_labelled_cidata(tmp_path: Path, files: dict[str, bytes], open_iso: IsoOpener) -> None:
    """cloud-init finds a NoCloud seed by the volume label `cidata`."""
    write_seed_iso(tmp_path / "seed.iso", files)

    iso = open_iso(tmp_path / "seed.iso")

    assert iso.pvd.volume_identifier.decode().rstrip() == "cidata"
    assert iso.has_rock_ridge()
    assert iso.has_joliet()


@pytest.mark.parametrize("tree", ["rr_path", "joliet_path"])
def test_each_file_reads_back_byte_exact_under_its_real_name(
    tmp_path: Path, files: dict[str, bytes], open_iso: IsoOpener, tree: str
) -> None:
    """Rock Ridge (Linux) and Joliet (others) both show user-data, meta-data, network-config exactly."""
    write_seed_iso(tmp_path / "seed.iso", files)

    iso = open_iso(tmp_path / "seed.iso")

    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    assert {name: extract(iso, **{tree: f"/{name}"}) for name in files} == files
    assert files["user-data"] == USER_DATA.encode()


def test_iso_is_private_and_leaves_no_temporary_file(tmp_path: Path, files: dict[str, bytes]) -> None:
    """The seed may hold secrets: mode 0600, and only the final file remains in the directory."""
    write_seed_iso(tmp_path / "seed.iso", files)

    assert stat.S_IMODE((tmp_path / "seed.iso").stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["seed.iso"]


def test_rewrite_replaces_the_file_atomically(
    tmp_path: Path, files: dict[str, bytes], open_iso: IsoOpener
) -> None:
    """A rewrite renames a new inode over the old one: a reader of the old file keeps the old content."""
    path = tmp_path / "seed.iso"
    write_seed_iso(path, files)
    old_inode = path.stat().st_ino
    with path.open("rb") as old_reader:
        write_seed_iso(path, {**files, "user-data": b"#cloud-config\n{}\n"})

        assert extract(open_iso(old_reader), rr_path="/user-data") == USER_DATA.encode()

    assert path.stat().st_ino != old_inode
    assert extract(open_iso(path), rr_path="/user-data") == b"#cloud-config\n{}\n"
    assert os.listdir(tmp_path) == ["seed.iso"]


def test_writing_the_same_files_again_is_harmless(
    tmp_path: Path, files: dict[str, bytes], open_iso: IsoOpener
) -> None:
    """Idempotent: a second write of the same files leaves an image with the same content."""
    path = tmp_path / "seed.iso"
    write_seed_iso(path, files)
    write_seed_iso(path, files)

    iso = open_iso(path)

    assert {name: extract(iso, rr_path=f"/{name}") for name in files} == files


def test_colliding_iso_names_are_refused(tmp_path: Path) -> None:
    """Two names equal in their first 8 ISO characters are an error, not a silently lost file."""
    with pytest.raises(ValueError, match="collide"):
        write_seed_iso(tmp_path / "seed.iso", {"user-data-1": b"a", "user-data-2": b"b"})

    assert os.listdir(tmp_path) == []
