"""Output folders that never lose data: an ownership marker, one writer at a time, an atomic commit.

    from strataprune.runtime.reports import atomic_output_dir, check_output_dir
    check_output_dir(Path("out"), overwrite=False)     # before any work: refuse, lock, clean leftovers
    with atomic_output_dir(Path("out"), overwrite=False, command="run") as tmp:
        (tmp / "report.json").write_text("{}")          # becomes out/ only if the block succeeds

The rules, in the order they are applied:

- Location: the destination must not be a file, lie under a file or be a filesystem root, and the
  folder that will hold it must accept new files (``/proc/x``, a read-only folder). Checked before
  any work, as one error.
- Ownership: strataprune replaces only a folder it wrote itself (it holds ``.strataprune-output.json``
  naming the command, version and the files written; outputs of earlier versions are recognised by
  their ``report.json``/``summary.json``) or an empty one. Any other folder is refused, even with
  ``overwrite``, and so is an output folder to which files were added by hand (they are named).
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
- Permissions: folders are created with ``0o777`` minus the umask, like ``mkdir``.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strataprune.contract.errors import OutputError

MARKER = ".strataprune-output.json"
_TMP, _OLD, _LOCK = "strataprune-tmp", "strataprune-old", "strataprune-lock"
_LEFTOVER = re.compile(rf"^({_TMP}|{_OLD})-(\d+)-[0-9a-f]{{8}}$")
_LEGACY_LEFTOVER = re.compile(r"^(tmp|old)-[A-Za-z0-9_]{8}$")  # mkdtemp names of strataprune <= 0.1.0
#: files a run of an earlier version wrote at the top of its output (besides the model's own files)
_LEGACY_REPORTS = ("report.json", "summary.json")

#: the command recorded in markers and lock files when the caller does not name one (set by the CLI)
current_command: contextvars.ContextVar[str] = contextvars.ContextVar("strataprune_command", default="python")


def _say(message: str) -> None:
    print(f"strataprune: {message}", file=sys.stderr, flush=True)


@dataclass
class _Lock:
    file: Path
    fd: int
    created: list[Path] = field(default_factory=list)  # parent folders made for the lock, removed if left empty


_held: dict[Path, _Lock] = {}


# --------------------------------------------------------------------------- public
def check_output_dir(
    path: str | Path,
    overwrite: bool,
    *,
    lock: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Refuse an output folder strataprune may not write, before any work; then lock it for this run.

    Raises OutputError for: a file or a path under a file, a folder that cannot take new files, a
    non-empty folder without ``overwrite``, a folder strataprune did not write (or with files it did
    not write) even with ``overwrite``, a destination another run is writing. With ``lock`` (default)
    the destination stays locked for this process until ``atomic_output_dir`` commits, or
    ``release_output_locks()``; stale temporaries of killed runs are cleaned or reported.
    """
    dest = _absolute(path)
    _check_location(dest)
    _check_replaceable(dest, overwrite)
    if lock:
        newly = dest not in _held
        _acquire(dest, command)
        try:
            _clean_leftovers(dest, log or _say)
            _check_replaceable(dest, overwrite)  # a restored old output may now be there
        except BaseException:
            if newly:
                release_output_lock(dest)
            raise


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool, *, command: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block succeeds it replaces ``path``.

    A failure inside the block removes the temporary folder and leaves ``path`` as it was. The
    commit re-checks the lock and the destination and swaps atomically (see the module docstring).
    The lock taken by ``check_output_dir`` (or here) is released afterwards.
    """
    dest = _absolute(path)
    check_output_dir(dest, overwrite, command=command)
    try:
        tmp = _new_temporary(dest, command)
        try:
            yield tmp
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
    dest = _absolute(path)
    marker = _read_json(dest / MARKER)
    if marker is not None and marker.get("tool") == "strataprune":
        return marker
    for name in _LEGACY_REPORTS:
        report = _read_json(dest / name)
        if report is not None and isinstance(report.get("environment"), dict) and "strataprune" in report["environment"]:
            return {"tool": "strataprune", "version": report["environment"]["strataprune"], "legacy_report": name}
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
            f"output '{dest}' is not empty and was not written by strataprune (no {MARKER} or strataprune report); "
            "it is left untouched: choose another --output (--overwrite replaces only strataprune's own outputs)"
        )
    if not overwrite:
        what = f"strataprune {owner.get('command', 'output')}" if "command" in owner else "a strataprune output"
        raise OutputError(f"output '{dest}' already holds {what}; pass --overwrite to replace it or choose another --output")
    foreign = _foreign_entries(dest, entries, owner)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"--overwrite refused: output '{dest}' holds files strataprune did not write ({shown}); "
            "move them away or choose another --output"
        )


def _foreign_entries(dest: Path, entries: list[str], owner: dict[str, Any]) -> list[str]:
    """Top-level entries of an output folder that its writer did not record (added by hand later)."""
    if isinstance(owner.get("files"), list):
        known = set(owner["files"]) | {MARKER}
        return [name for name in entries if name not in known]
    # an earlier version's output: model files at the top, allocate's <allocator>/allocation.json below
    foreign = []
    for name in entries:
        entry = dest / name
        if entry.is_symlink() or (entry.is_dir() and _entries(entry) != ["allocation.json"]):
            foreign.append(name)
        elif not entry.is_dir() and not entry.is_file():
            foreign.append(name)
    return foreign


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
                f"output '{dest}' is being written by another strataprune run ({who}); wait for it to finish or choose another "
                "--output"
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
                    f"'{entry}' has a strataprune temporary's name but no strataprune marker; left alone, delete it if you do "
                    "not need it"
                )
                continue
            if kind == _OLD and not dest.exists():
                os.rename(entry, dest)
                log(
                    f"restored the previous output '{dest}' from '{entry.name}', where an interrupted commit (pid {pid}) had "
                    "moved it"
                )
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed '{entry}', left by an interrupted strataprune run (pid {pid})")
        elif _LEGACY_LEFTOVER.match(rest) and entry.is_dir():
            note = " (it may hold the previous output)" if rest.startswith("old") else ""
            log(
                f"found '{entry}', left by an interrupted run of an earlier strataprune{note}; not removed, delete it if you do "
                "not need it"
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


def _finish_marker(tmp: Path, dest: Path) -> None:
    marker = _read_json(tmp / MARKER) or {}
    marker.update(
        state="complete", finished=_now(), destination=str(dest), files=sorted(name for name in _entries(tmp) if name != MARKER)
    )
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))


def _commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    _finish_marker(tmp, dest)
    try:
        _verify_lock(dest)
        _check_location(dest)
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
            f"could not move the previous output '{dest}' aside ({exc.strerror}); it is unchanged, the new one is kept in "
            f"'{_keep(tmp, dest)}'"
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
