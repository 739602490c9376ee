"""The cache's content keys: one conversion per file content, whatever folder or environment holds the file."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from strataprune.contract.cache import content_key
from strataprune.models.files import converted_folder


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _reference_key(path: Path, salt: str = "") -> str:
    """The key from its definition: sha1 over "size:salt:" and then every byte of the file."""
    data = path.read_bytes()
    return hashlib.sha1(f"{len(data)}:{salt}:".encode() + data).hexdigest()[:12]


def test_a_copy_in_another_folder_with_another_time_has_the_same_key(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    first = _write(tmp_path / "env-a" / "site-packages" / "model.gguf", data)
    second = tmp_path / "env-b" / "lib" / "model.gguf"
    second.parent.mkdir(parents=True)
    shutil.copyfile(first, second)
    os.utime(second, ns=(1, 1))
    assert content_key(first) == content_key(second) == _reference_key(first)


def test_a_change_anywhere_or_in_the_size_changes_the_key(tmp_path: Path) -> None:
    data = bytearray(os.urandom(10 << 20))
    base = content_key(_write(tmp_path / "base.bin", bytes(data)))
    keys = {base}
    middle = len(data) // 2  # two prunings of one model: same size, header and tail, other weights between
    for name, changed in (
        ("head", data[:10] + bytes([data[10] ^ 1]) + data[11:]),
        ("middle", data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]),
        ("tail", data[:-1] + bytes([data[-1] ^ 1])),
        ("longer", data + b"\0"),
    ):
        path = _write(tmp_path / f"{name}.bin", bytes(changed))
        assert content_key(path) == _reference_key(path)
        keys.add(content_key(path))
    assert len(keys) == 5


def test_small_files_and_salts(tmp_path: Path) -> None:
    small = _write(tmp_path / "small.bin", b"GGUF" + bytes(100))
    empty = _write(tmp_path / "empty.bin", b"")
    assert content_key(small) == _reference_key(small) and content_key(empty) == _reference_key(empty)
    assert content_key(small, salt="v2") == _reference_key(small, "v2") != content_key(small)


def test_converted_folder_is_shared_between_environments(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STRATAPRUNE_CACHE", str(tmp_path / "cache"))
    data = os.urandom(2 << 20)
    a = _write(tmp_path / "venv-1" / "smollm2" / "model.gguf", data)
    b = _write(tmp_path / "venv-2" / "smollm2" / "model.gguf", data)
    assert converted_folder(a, "smollm2-135m") == converted_folder(b, "smollm2-135m")
    assert converted_folder(a, "smollm2-135m").parent == tmp_path / "cache" / "models"
    c = _write(tmp_path / "venv-3" / "smollm2" / "model.gguf", data[:-1] + b"x")
    assert converted_folder(c, "smollm2-135m") != converted_folder(a, "smollm2-135m")


def test_a_file_rewritten_in_place_gets_its_new_key(tmp_path: Path) -> None:
    """Keys are remembered per file identity; rewriting the bytes (new mtime/ctime) must not return the old key."""
    path = _write(tmp_path / "model.gguf", os.urandom(4096))
    first = content_key(path)
    assert content_key(path) == first  # remembered
    path.write_bytes(os.urandom(4096))
    os.utime(path, ns=(5, 5))
    assert content_key(path) == _reference_key(path) != first
