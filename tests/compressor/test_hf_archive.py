"""Checkpoint archives are untrusted: nothing escapes the destination, no links, no bombs."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from compressor.errors import UnsafeModelError
from compressor.load.huggingface import archive as archives
from compressor.load.huggingface.archive import archive_kind, extract_archive


def make_zip(path: Path, members: dict[str, bytes], mode: int | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as out:
        for name, content in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if mode is not None:
                info.external_attr = mode << 16
            out.writestr(info, content)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], payloads: dict[str, bytes] | None = None,
             mode: str = "w:gz") -> Path:
    payloads = payloads or {}
    with tarfile.open(path, mode) as out:
        for info in members:
            data = payloads.get(info.name)
            if data is not None:
                info.size = len(data)
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "job" / "unpacked"
    folder.mkdir(parents=True)
    return folder


def test_a_good_zip_and_tar_unpack_with_their_folders(tmp_path, dest) -> None:
    members = {"config.json": b"{}", "1_Pooling/config.json": b"{}"}
    extract_archive(make_zip(tmp_path / "upload.zip", members), dest)
    assert (dest / "1_Pooling" / "config.json").read_bytes() == b"{}"
    other = tmp_path / "other"
    other.mkdir()
    tar = make_tar(tmp_path / "upload.tar.gz", [tar_member("./model", tarfile.DIRTYPE), tar_member(
        "./model/config.json")], {"./model/config.json": b"{}"})
    extract_archive(tar, other)
    assert (other / "model" / "config.json").read_bytes() == b"{}"
    assert archive_kind(tar) == "tar.gz"
    assert archive_kind(make_tar(tmp_path / "plain.tar", [tar_member("a")], {"a": b"x"},
                                 mode="w")) == "tar"


@pytest.mark.parametrize(("name", "phrase"), [
    ("../escaped.txt", "zip-slip"),
    ("model/../../escaped.txt", "zip-slip"),
    ("/tmp/escaped.txt", "absolute path"),
    ("C:/escaped.txt", "absolute path"),
    ("model\\..\\escaped.txt", "backslash"),
])
def test_zip_members_that_would_land_outside_are_refused(tmp_path, dest, name, phrase) -> None:
    archive = make_zip(tmp_path / "upload.zip", {"config.json": b"{}", name: b"gotcha"})
    with pytest.raises(UnsafeModelError, match=phrase):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not list(tmp_path.parent.rglob("escaped.txt"))


def test_tar_members_that_would_land_outside_are_refused(tmp_path, dest) -> None:
    archive = make_tar(tmp_path / "upload.tar.gz", [tar_member("../escaped.txt")],
                       {"../escaped.txt": b"x"})
    with pytest.raises(UnsafeModelError, match="zip-slip"):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []


def test_a_zip_symlink_member_is_refused(tmp_path, dest) -> None:
    archive = make_zip(tmp_path / "upload.zip", {"model.safetensors": b"/etc/passwd"},
                       mode=stat.S_IFLNK | 0o777)
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(("kind", "phrase"), [
    (tarfile.SYMTYPE, "symbolic link"),
    (tarfile.LNKTYPE, "hard link"),
    (tarfile.CHRTYPE, "device or FIFO"),
    (tarfile.FIFOTYPE, "device or FIFO"),
])
def test_tar_links_and_special_files_are_refused(tmp_path, dest, kind, phrase) -> None:
    archive = make_tar(tmp_path / "upload.tar.gz", [
        tar_member("config.json"), tar_member("model.safetensors", kind, "/etc/passwd")],
        {"config.json": b"{}"})
    with pytest.raises(UnsafeModelError, match=phrase):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []


def test_a_zip_bomb_is_refused_before_it_is_expanded(tmp_path, dest) -> None:
    archive = make_zip(tmp_path / "upload.zip", {"model.safetensors": b"\0" * (40 << 20)})
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(UnsafeModelError, match="zip bomb"):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []


def test_a_tar_gz_bomb_is_refused(tmp_path, dest) -> None:
    archive = make_tar(tmp_path / "upload.tar.gz", [tar_member("model.safetensors")],
                       {"model.safetensors": b"\0" * (40 << 20)})
    with pytest.raises(UnsafeModelError, match="decompression bomb"):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []


def test_too_many_members_and_too_many_bytes_are_refused(tmp_path, dest, monkeypatch) -> None:
    many = make_zip(tmp_path / "many.zip", {f"f{i}": b"" for i in range(archives.MAX_MEMBERS + 1)})
    with pytest.raises(UnsafeModelError, match="more than 1000 members"):
        extract_archive(many, dest)
    monkeypatch.setattr(archives, "MAX_TOTAL_BYTES", 100)
    big = make_zip(tmp_path / "big.zip", {"a": b"x" * 101}, compression=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeModelError, match="expands to more than"):
        extract_archive(big, dest)


def test_a_member_that_lies_about_its_size_is_refused(tmp_path, dest) -> None:
    archive = make_zip(tmp_path / "upload.zip", {"a": b"x" * 1000},
                       compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    # shrink the declared size in the central directory (and local header) to 10 bytes
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = raw.index(signature)
        raw[at + offset:at + offset + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnsafeModelError):
        extract_archive(archive, dest)


def test_duplicate_members_and_non_archives_are_refused(tmp_path, dest) -> None:
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as out:
        out.writestr("config.json", b"{}")
        out.writestr("./config.json", b"{}")
    with pytest.raises(UnsafeModelError, match="appears twice"):
        extract_archive(tmp_path / "dup.zip", dest)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"hello")
    with pytest.raises(UnsafeModelError, match="neither a .zip nor a .tar"):
        extract_archive(plain, dest)
