"""Local text: reading files safely, and any text file as a dataset (e.g. a local copy of WikiText-2's wiki.test.raw).

    strataprune eval out/ --data path/to/wikitext-2/wiki.test.raw   # the papers' WikiText-2 protocol
    strataprune eval out/ --data notes.txt --encoding latin-1

A file is decoded strictly: binary data (NUL bytes) and bytes that are not valid in the named encoding
(UTF-8 unless told otherwise) are refused with the offset of the first bad byte, never turned into
replacement characters. A file has no splits: it is one ``all`` split (calibration on a file keeps
its last 10% of tokens for selection, strataprune/data/text_windows.py). Files named like WikiText's own
(``wiki.test.raw``, ``wiki.valid.tokens`` ...) default to the papers' ``wikitext2`` protocol, others
to ``documents``.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import stat
import time
from pathlib import Path

from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import ConfigError, DataError, StrataPruneError

#: file names of the WikiText distribution (wikitext-2-raw-v1 / wikitext-2-v1)
WIKITEXT_FILE = re.compile(r"^wiki\.(train|valid|test)\.(raw|tokens)$")


def looks_like_path(source: str) -> bool:
    """A text source that names a file (it exists, has a suffix or a '/') rather than a registered dataset."""
    path = Path(source).expanduser()
    return path.exists() or bool(path.suffix) or "/" in source


def is_image_source(source: str) -> bool:
    """Whether ``source`` names image data (``photos`` or an existing folder) rather than text; kept here,
    beside ``looks_like_path``, so the checks before the heavy imports can tell the two apart."""
    return source == "photos" or Path(source).expanduser().is_dir()


def decode_text(raw: bytes, what: str, encoding: str = "utf-8", error: type[StrataPruneError] = DataError) -> str:
    """Bytes -> text, refusing binary data (NUL bytes) and bytes that are not valid ``encoding``."""
    if b"\0" in raw[:65536] and not encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32")):
        raise error(f"{what} is a binary file, not text")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} is not valid {encoding} text (byte 0x{raw[exc.start : exc.start + 1].hex()} at offset {exc.start}); "
            "convert it to UTF-8 or name its encoding (recipe key calibration.encoding / evaluation.encoding, eval --encoding)"
        ) from None
    except LookupError:
        raise ConfigError(f"{what}: {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, cp1252)") from None


#: the largest text file read (decoded, a file takes up to 5x its size in memory: bytes + str); larger ones are
#: refused before they are read, so a wrong path (a disk image, a log that grows) cannot exhaust memory
TEXT_MAX_BYTES = 1 << 30
#: a pipe (``<(zcat corpus.gz)``, a FIFO) that gives no byte for this long is refused instead of waited on forever
PIPE_IDLE_SECONDS = 30.0
#: a named FIFO reads as empty until its writer opens it: wait this long for a first byte before calling it unused
PIPE_WRITER_WAIT_SECONDS = 5.0
#: pipes are read once: their contents by path, so the checks before the work and the work read the same text
_PIPE_CONTENTS: dict[str, bytes] = {}


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _read_pipe(path: Path, what: str, limit: int, error: type[StrataPruneError]) -> bytes:
    """A pipe read once, to its end, with a size cap and an idle timeout (never blocks on a FIFO nobody writes)."""
    key = str(path)
    if key in _PIPE_CONTENTS:
        return _PIPE_CONTENTS[key]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without a writer opens at once and reads as empty
    except OSError as exc:
        raise error(f"{what} '{path}' cannot be read ({exc.strerror})") from None
    chunks: list[bytes] = []
    size = 0
    writer_deadline = time.monotonic() + PIPE_WRITER_WAIT_SECONDS
    try:
        while True:
            try:  # read first: Linux reports a FIFO that never had a writer as readable only through read() == b""
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:  # a writer is attached but has not written yet
                ready, _, _ = select.select([fd], [], [], PIPE_IDLE_SECONDS)
                if not ready:
                    raise error(
                        f"{what} '{path}' is a pipe that gave no data for {PIPE_IDLE_SECONDS:g} s; nothing seems to write to it"
                    ) from None
                continue
            if not chunk:
                if size == 0 and time.monotonic() < writer_deadline:  # no writer yet (or an empty pipe): wait for one
                    time.sleep(0.05)
                    continue
                break
            size += len(chunk)
            if size > limit:
                raise error(f"{what} '{path}' is a pipe that gave more than {limit:,} bytes, the most read as {what}")
            chunks.append(chunk)
    finally:
        os.close(fd)
    if size == 0:
        raise error(f"{what} '{path}' is a pipe that gave no data in {PIPE_WRITER_WAIT_SECONDS:g} s (nothing writes to it)")
    raw = b"".join(chunks)
    _PIPE_CONTENTS[key] = raw
    return raw


def read_bytes_bounded(path: Path, what: str, limit: int, error: type[StrataPruneError] = DataError) -> bytes:
    """A file's bytes, read once: regular files up to ``limit`` bytes, pipes (FIFOs, ``<(...)``) to their end
    within ``limit`` and an idle timeout; devices, sockets and folders are refused, each with one error."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise error(f"{what} '{path}' cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} '{path}' is a directory, not a file")  # not "does not exist": it does
    if stat.S_ISFIFO(info.st_mode):
        return _read_pipe(path, what, limit, error)
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} '{path}' is {_file_kind(info.st_mode)}; give a regular file (or a pipe)")
    if info.st_size > limit:
        raise error(f"{what} '{path}' is {info.st_size:,} bytes; the most read as {what} is {limit:,} bytes")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)  # the file may have grown since stat
    except OSError as exc:
        raise error(f"{what} '{path}' cannot be read ({exc.strerror})") from None
    if len(raw) > limit:
        raise error(f"{what} '{path}' grew past {limit:,} bytes while being read; the most read as {what} is {limit:,} bytes")
    return raw


def read_text_file(
    path: Path,
    what: str,
    encoding: str = "utf-8",
    error: type[StrataPruneError] = DataError,
    limit: int | None = None,
) -> str:
    """A text file's contents, or one error saying why not: missing, a folder, a device, too large, unreadable,
    binary, wrong encoding. ``limit``: the most bytes read (default TEXT_MAX_BYTES)."""
    raw = read_bytes_bounded(path, what, TEXT_MAX_BYTES if limit is None else limit, error)
    return decode_text(raw, f"{what} '{path}'", encoding, error)


class TextFile(Dataset):
    name = "textfile"
    version = "2"
    summary = "a local text file (UTF-8 unless an encoding is given), one split 'all'"
    splits = ("all",)

    def __init__(self, path: str | Path, encoding: str = "utf-8") -> None:
        super().__init__()
        self.path = Path(path)
        self.encoding = encoding
        self.text = read_text_file(self.path, "text file", encoding)  # read once, checked before any model loads
        if not self.text.strip():
            raise DataError(f"text file '{self.path}' has no text")
        self.reference_protocol = "wikitext2" if WIKITEXT_FILE.match(self.path.name) else "documents"
        raw = self.text.encode(encoding)  # the file's bytes again (decoding checked they round-trip)
        self._size, self._sha256 = len(raw), hashlib.sha256(raw).hexdigest()

    def rows(self, split: str) -> list[str]:
        """The lines as the Hugging Face text loaders yield them: each with its "\\n" (any line ending
        becomes "\\n"), blank lines as "" (WikiText's loader: ``row if row.strip() else ""``)."""
        parts = self.text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        return [line if line.strip() else "" for line in lines]

    def documents(self, split: str) -> list[str]:
        # the per-document protocol: one paragraph a line, blank lines dropped
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    def describe(self) -> dict[str, object]:
        return {
            "name": "textfile",
            "path": str(self.path.resolve()),
            "bytes": self._size,
            "encoding": self.encoding,
            "file_sha256": self._sha256,
        }
