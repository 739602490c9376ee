"""Output folders that never lose data: an ownership marker, one writer at a time, an atomic commit.

    from strataprune.runtime.reports import atomic_output_dir, check_output_dir
    check_output_dir(Path("out"), overwrite=False)     # before any work: refuse, lock, clean leftovers
    with atomic_output_dir(Path("out"), overwrite=False, command="run") as tmp:
        (tmp / "report.json").write_text("{}")          # becomes out/ only if the block succeeds

The rules, in the order they are applied:

- Location: the destination must not be a file, lie under a file or be a filesystem root, and the
  folder that will hold it must accept new files (``/proc/x``, a read-only folder). Checked before
  any work, as one error.
- Apart from the inputs: the destination may not be, contain or lie inside any input of the command
  (the model, run folders, text and image sources, grids, merged results), compared on resolved
  paths (symbolic links followed); checked before the work and again at the commit.
- Ownership: strataprune replaces only an empty folder or a folder it wrote itself, and in it only
  what it wrote: the marker ``.strataprune-output.json`` holds a manifest of every file (recursively)
  with its size and SHA-256, written at the commit. ``overwrite`` refuses, naming them, any file or
  folder the manifest does not list and any listed file whose content changed since. A folder
  without a manifest (no marker, a marker of an earlier version that listed only names, a copied
  ``report.json``) is never replaced. Hashes are cached per process by (device, inode, size,
  mtime, ctime), so the checks before the work and at the commit read each file once.
- One writer per destination: ``check_output_dir`` takes an exclusive ``flock`` on
  ``.NAME.strataprune-lock`` beside the destination and holds it until the commit (or
  ``release_output_locks()``, or the process ends: the kernel drops the lock of a killed process), so
  a second run for the same destination fails at once, before its work. The commit checks the lock
  and the destination again.
- Commit: the output is written into ``.NAME.strataprune-tmp-PID-XXXXXXXX`` beside the destination
  and swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux). Where that call is missing,
  the old output is renamed aside and the new one renamed in; if the second rename fails the first
  is undone. At every moment either the old or the new complete output is at the destination; if a
  commit cannot finish, the error says where each output is, and nothing is deleted.
- Leftovers: a run killed while saving leaves its temporary folder (and, in the two-rename path, the
  aside-moved old output). The next run for the same destination, holding the lock, removes the
  temporaries whose process is gone, puts back an old output whose destination is missing, and says
  so on stderr. Folders of unknown origin are reported, never removed.
- Permissions: folders get ``0o777`` and files ``0o666`` minus the umask, like ``mkdir`` and ``open``
  (writers such as safetensors create files ``0o600`` through temporary files; the commit evens this out).
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strataprune.contract.errors import OutputError

MARKER = ".strataprune-output.json"
_TMP, _OLD, _LOCK = "strataprune-tmp", "strataprune-old", "strataprune-lock"
_LEFTOVER = re.compile(rf"^({_TMP}|{_OLD})-(\d+)-[0-9a-f]{{8}}$")
_LEGACY_LEFTOVER = re.compile(r"^(tmp|old)-[A-Za-z0-9_]{8}$")  # mkdtemp names of strataprune <= 0.1.0
#: the marker's format: 2 = ``files`` maps every file's relative path to its size and SHA-256
MANIFEST_VERSION = 2

#: the command recorded in markers and lock files when the caller does not name one (set by the CLI)
current_command: contextvars.ContextVar[str] = contextvars.ContextVar("strataprune_command", default="python")


def _say(message: str) -> None:
    print(f"strataprune: {message}", file=sys.stderr, flush=True)


@dataclass
class _Lock:
    file: Path
    fd: int
    created: list[Path] = field(default_factory=list)  # parent folders made for the lock, removed if left empty
    inputs: dict[str, Path] = field(default_factory=dict)  # what the command reads: checked again at the commit


_held: dict[Path, _Lock] = {}


# --------------------------------------------------------------------------- public
def check_output_dir(
    path: str | Path,
    overwrite: bool,
    *,
    lock: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
    appending: bool = False,
) -> None:
    """Refuse an output folder strataprune may not write, before any work; then lock it for this run.

    Raises OutputError for: a file or a path under a file, a folder that cannot take new files, a
    destination that is, contains or lies inside one of ``inputs`` (``{"--model": path, ...}``; names
    that are not paths on disk, such as a dataset or hub name, are skipped), a non-empty folder
    without ``overwrite``, a folder without a strataprune manifest or with files or folders it does
    not list or whose content changed, even with ``overwrite``, a destination another run is
    writing. With ``lock`` (default) the destination stays locked for this process until
    ``atomic_output_dir`` commits, or ``release_output_locks()``; stale temporaries of killed runs
    are cleaned or reported. The inputs are remembered with the lock and checked again at the commit.
    ``appending``: the caller adds to a folder of its own kind and replaces nothing (the leaderboard);
    it has checked ownership itself, so only location, inputs and the lock are checked here.
    """
    dest = _absolute(path)
    _check_location(dest)
    known = dict(_held[dest].inputs) if dest in _held else {}
    known.update(_input_paths(inputs))
    check_apart(dest, known)
    if not appending:
        _check_replaceable(dest, overwrite)
    if lock:
        newly = dest not in _held
        _acquire(dest, command)
        _held[dest].inputs.update(known)
        try:
            _clean_leftovers(dest, log or _say)
            if not appending:
                _check_replaceable(dest, overwrite)  # a restored old output may now be there
        except BaseException:
            if newly:
                release_output_lock(dest)
            raise


def check_apart(output: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (on resolved paths).

    ``inputs`` maps a label for messages (``--model``, ``the run``) to a path; values that name
    nothing on disk (a dataset or hub name, None) are skipped.
    """
    dest = Path(os.path.realpath(_absolute(output)))
    for label, source in _input_paths(inputs).items():
        real = Path(os.path.realpath(source))
        if real == dest:
            how = "is"
        elif dest.is_relative_to(real):
            how = "lies inside"
        elif real.is_relative_to(dest):
            how = "contains"
        else:
            continue
        shown = f"'{source}'" + (f" (resolved: '{real}')" if Path(source) != real else "")
        raise OutputError(
            f"output '{output}' {how} {label} {shown}, which this command reads; an output may never overlap its inputs: "
            "choose another --output"
        )


def _input_paths(inputs: Mapping[str, str | Path | None] | None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for label, source in (inputs or {}).items():
        if source is None or str(source) == "":
            continue
        candidate = _absolute(source)
        if os.path.lexists(candidate):
            found[label] = candidate
    return found


@contextmanager
def atomic_output_dir(
    path: str | Path,
    overwrite: bool,
    *,
    command: str | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block succeeds it replaces ``path``.

    A failure inside the block (an interrupt or SIGTERM too) removes the temporary folder and leaves
    ``path`` as it was. The commit writes the manifest, re-checks the lock, the inputs (``inputs``
    and those given to ``check_output_dir``) and the destination, and swaps atomically (see the
    module docstring). The lock taken by ``check_output_dir`` (or here) is released afterwards.
    """
    dest = _absolute(path)
    check_output_dir(dest, overwrite, command=command, inputs=inputs)
    try:
        tmp = _new_temporary(dest, command)
        try:
            yield tmp
            _finish_marker(tmp, dest)  # hashing a large model takes a while: an interrupt here removes tmp too
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _commit(tmp, dest, overwrite)
    finally:
        release_output_lock(dest)


def release_output_lock(path: str | Path) -> None:
    """Drop this process's lock on an output destination (no-op when it holds none)."""
    held = _held.pop(_absolute(path), None)
    if held is None:
        return
    try:
        if _same_file(held.fd, held.file):
            held.file.unlink()
    except OSError:
        pass
    os.close(held.fd)
    for folder in held.created:  # deepest first: parents this lock created and nothing else filled
        try:
            folder.rmdir()
        except OSError:
            break


def release_output_locks() -> None:
    """Drop every output lock of this process (the CLI calls it when a command ends, however it ends)."""
    for dest in list(_held):
        release_output_lock(dest)


def output_owner(path: str | Path) -> dict[str, Any] | None:
    """What strataprune recorded about an output folder it wrote (its marker), or None if it did not."""
    marker = _read_json(_absolute(path) / MARKER)
    if marker is not None and marker.get("tool") == "strataprune":
        return marker
    return None


# --------------------------------------------------------------------------- checks
def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _check_location(dest: Path) -> None:
    if dest.parent == dest:
        raise OutputError(f"output '{dest}' is a filesystem root; choose a folder inside it")
    if dest.is_symlink():  # the commit swaps names: it would replace the link, not the folder it points to
        raise OutputError(f"output '{dest}' is a symbolic link; give the folder it points to ('{dest.resolve()}')")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output '{dest}' exists and is not a folder; choose another --output")
    ancestor = dest.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output '{dest}' lies under '{ancestor}', which is a file, not a folder; choose another --output")
    try:
        fd, probe = tempfile.mkstemp(prefix=".strataprune-probe-", dir=ancestor)
    except OSError as exc:
        raise OutputError(
            f"output '{dest}': cannot create files in '{ancestor}' ({exc.strerror}); choose another --output"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _entries(dest: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in dest.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"output '{dest}' cannot be read ({exc.strerror})") from None


def _check_replaceable(dest: Path, overwrite: bool) -> None:
    if not dest.is_dir():
        return
    entries = _entries(dest)
    if not entries:
        return
    owner = output_owner(dest)
    if owner is None:
        raise OutputError(
            f"output '{dest}' is not empty and was not written by strataprune (no {MARKER}); "
            "it is left untouched: choose another --output (--overwrite replaces only strataprune's own outputs)"
        )
    if owner.get("state") == "appending":
        raise OutputError(
            f"output '{dest}' holds a strataprune {owner.get('command', 'leaderboard')}, which is appended to, never replaced; "
            "choose another --output"
        )
    if not overwrite:
        what = f"strataprune {owner.get('command', 'output')}" if "command" in owner else "a strataprune output"
        raise OutputError(f"output '{dest}' already holds {what}; pass --overwrite to replace it or choose another --output")
    if not isinstance(owner.get("files"), dict):
        raise OutputError(
            f"--overwrite refused: output '{dest}' was written by an earlier strataprune ({owner.get('version', '?')}) "
            "whose marker lists no file sizes and hashes, so files added or edited by hand cannot be told apart; "
            "it is left untouched: delete it yourself or choose another --output"
        )
    foreign = foreign_files(dest, owner)
    if foreign:

        def shown(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        added = [name for name in foreign if not name.endswith(_CHANGED)]
        changed = [name[: -len(_CHANGED)] for name in foreign if name.endswith(_CHANGED)]
        parts = [f"files strataprune did not write ({shown(added)})"] if added else []
        parts += [f"files changed since strataprune wrote them ({shown(changed)})"] if changed else []
        raise OutputError(
            f"--overwrite refused: output '{dest}' holds {' and '.join(parts)}; move them away or choose another --output"
        )


def foreign_files(dest: Path, owner: dict[str, Any]) -> list[str]:
    """What ``--overwrite`` would lose in ``dest``: every file or folder (recursively) that the manifest
    in ``owner`` does not list, and every listed file whose size or SHA-256 changed ("NAME (changed)")."""
    files: dict[str, Any] = owner.get("files") or {}
    folders = set(owner.get("folders") or [])
    found: list[str] = []

    def visit(folder: Path, prefix: str) -> None:
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise OutputError(f"output '{dest}': cannot read '{folder}' ({exc.strerror})") from None
        for child in children:
            rel = prefix + child.name
            if prefix == "" and child.name == MARKER:
                continue
            if child.is_dir(follow_symlinks=False):
                if rel in folders:
                    visit(Path(child.path), rel + "/")
                else:
                    found.append(rel + "/")
            elif child.is_file(follow_symlinks=False) and isinstance(files.get(rel), dict):
                entry = files[rel]
                stat = child.stat(follow_symlinks=False)
                if stat.st_size != entry.get("size") or _sha256(Path(child.path), stat) != entry.get("sha256"):
                    found.append(rel + _CHANGED)
            else:  # not listed, or a link / device / pipe, which strataprune never writes
                found.append(rel)

    visit(dest, "")
    return found


_CHANGED = " (changed)"
_hash_cache: dict[tuple[int, int, int, int, int], str] = {}


def _sha256(path: Path, stat: os.stat_result | None = None) -> str:
    """SHA-256 of a file, cached for this process by (device, inode, size, mtime, ctime): ctime cannot be
    set back by hand, so a cached hash is never stale."""
    stat = stat or path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


# --------------------------------------------------------------------------- lock
def _make_parents(folder: Path) -> list[Path]:
    created: list[Path] = []
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for item in reversed(missing):
        try:
            item.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create the output folder '{item}' ({exc.strerror})") from None
        created.append(item)
    return list(reversed(created))


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(dest: Path, command: str | None) -> None:
    if dest in _held:
        return
    import fcntl

    created = _make_parents(dest.parent)
    lock_file = dest.parent / f".{dest.name}.{_LOCK}"
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"output '{dest}': cannot create its lock file '{lock_file}' ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_json(lock_file) or {}
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"output '{dest}': cannot lock '{lock_file}' ({exc.strerror})") from None
            who = (
                f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, strataprune {holder.get('command', '?')}, "
                f"since {holder.get('started', '?')}"
            )
            raise OutputError(
                f"output '{dest}' is being written by another strataprune run ({who}); "
                "wait for it to finish or choose another --output"
            ) from None
        if _same_file(fd, lock_file):  # not a lock file that its previous holder unlinked meanwhile
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or current_command.get(), "started": _now()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _held[dest] = _Lock(lock_file, fd, created)


def _verify_lock(dest: Path) -> None:
    held = _held.get(dest)
    if held is None or not _same_file(held.fd, held.file):
        raise OutputError(
            f"output '{dest}': its lock file {dest.parent / f'.{dest.name}.{_LOCK}'} was removed during the run; not committing"
        )


# --------------------------------------------------------------------------- temporaries and leftovers
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes()[:1_000_000])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _new_temporary(dest: Path, command: str | None) -> Path:
    tmp = dest.parent / f".{dest.name}.{_TMP}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # mode 0o777 minus the umask
    from strataprune.version import __version__

    marker = {
        "tool": "strataprune",
        "version": __version__,
        "command": command or current_command.get(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _now(),
        "state": "writing",
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return tmp


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _clean_leftovers(dest: Path, log: Callable[[str], None]) -> None:
    """Under the destination's lock: remove stale temporaries of killed runs, restore a lost old output."""
    prefix = f".{dest.name}."
    try:
        siblings = [entry for entry in dest.parent.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return
    # old outputs first: one may have to go back to the destination before anything else is removed
    for entry in sorted(siblings, key=lambda e: _TMP in e.name):
        rest = entry.name[len(prefix) :]
        match = _LEFTOVER.match(rest)
        if match and entry.is_dir() and not entry.is_symlink():
            kind, pid = match.group(1), int(match.group(2))
            if pid_alive(pid):
                log(f"'{entry}' belongs to process {pid}, which is still running; left alone")
                continue
            if output_owner(entry) is None:
                log(
                    f"'{entry}' has a strataprune temporary's name but no strataprune marker; "
                    "left alone, delete it if you do not need it"
                )
                continue
            if kind == _OLD and not dest.exists():
                os.rename(entry, dest)
                log(
                    f"restored the previous output '{dest}' from '{entry.name}', "
                    f"where an interrupted commit (pid {pid}) had moved it"
                )
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed '{entry}', left by an interrupted strataprune run (pid {pid})")
        elif _LEGACY_LEFTOVER.match(rest) and entry.is_dir():
            note = " (it may hold the previous output)" if rest.startswith("old") else ""
            log(
                f"found '{entry}', left by an interrupted run of an earlier strataprune{note}; "
                "not removed, delete it if you do not need it"
            )


# --------------------------------------------------------------------------- commit
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where it is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _keep(tmp: Path, dest: Path) -> Path:
    """Give a finished output that could not be committed a visible name, so no cleaner removes it."""
    kept = dest.parent / f"{dest.name}.strataprune-new-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        os.rename(tmp, kept)
    except OSError:
        return tmp
    return kept


def umask() -> int:
    """This process's umask (read without changing it where Linux reports it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _manifest(tmp: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every file under ``tmp`` (its marker aside) with size and SHA-256, and every folder; modes evened
    out to the umask on the way (``0o666``/``0o777`` minus it; executables keep their execute bits)."""
    mask = umask()
    files: dict[str, dict[str, Any]] = {}
    folders: list[str] = []
    for root, dirs, names in os.walk(tmp):
        base = Path(root)
        rel_root = base.relative_to(tmp).as_posix()
        for name in sorted(dirs):
            os.chmod(base / name, 0o777 & ~mask)
            folders.append(name if rel_root == "." else f"{rel_root}/{name}")
        for name in sorted(names):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel == MARKER:
                continue
            item = base / name
            stat = item.lstat()
            if not os.path.isfile(item) or os.path.islink(item):
                continue  # a link: not listed, so a later --overwrite names it
            executable = stat.st_mode & 0o100
            os.chmod(item, (0o777 if executable else 0o666) & ~mask)
            stat = item.stat()
            files[rel] = {"size": stat.st_size, "sha256": _sha256(item, stat)}
    return dict(sorted(files.items())), sorted(folders)


def _finish_marker(tmp: Path, dest: Path) -> None:
    marker = _read_json(tmp / MARKER) or {}
    files, folders = _manifest(tmp)
    marker.update(
        state="complete", finished=_now(), destination=str(dest), manifest_version=MANIFEST_VERSION, files=files, folders=folders
    )
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    os.chmod(tmp / MARKER, 0o666 & ~umask())


def _commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    try:
        _verify_lock(dest)
        _check_location(dest)
        check_apart(dest, _held[dest].inputs)  # a link may have been changed during the run
        _check_replaceable(dest, overwrite)  # the destination may have changed during the run
    except OutputError as exc:
        raise OutputError(f"{exc}; the new output is kept in '{_keep(tmp, dest)}'") from None
    if not dest.exists():
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            raise OutputError(
                f"could not move the new output to '{dest}' ({exc.strerror}); it is kept in '{_keep(tmp, dest)}'"
            ) from None
        return
    try:
        exchanged = _exchange(tmp, dest)
    except OSError as exc:
        raise OutputError(
            f"could not swap the new output into '{dest}' ({exc.strerror}); the previous output is unchanged, "
            f"the new one is kept in '{_keep(tmp, dest)}'"
        ) from None
    if exchanged:
        shutil.rmtree(tmp, ignore_errors=True)  # it now holds the previous output; if this is cut short, the next run cleans it
        return
    _commit_by_two_renames(tmp, dest)


def _commit_by_two_renames(tmp: Path, dest: Path) -> None:
    old = dest.parent / f".{dest.name}.{_OLD}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(dest, old)
    except OSError as exc:
        raise OutputError(
            f"could not move the previous output '{dest}' aside ({exc.strerror}); it is unchanged, "
            f"the new one is kept in '{_keep(tmp, dest)}'"
        ) from None
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        try:
            os.rename(old, dest)
        except OSError:
            raise OutputError(
                f"could not move the new output into '{dest}' ({exc.strerror}) nor put the previous one back: "
                f"the previous output is in '{old}', the new one in '{tmp}'; nothing was deleted"
            ) from None
        raise OutputError(
            f"could not move the new output into '{dest}' ({exc.strerror}); the previous output is back in place, "
            f"the new one is kept in '{_keep(tmp, dest)}'"
        ) from None
    shutil.rmtree(old, ignore_errors=True)
