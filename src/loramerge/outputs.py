"""Files: the one place outputs are checked and written.

- :func:`check_output` refuses a target that is one of the inputs, that is not a regular file
  (a folder, a FIFO, a device: ``-o /dev/null`` run as root must not replace /dev/null), a
  symbolic link unless the caller follows it, or a folder output inside a folder it reads;
- :class:`Staged` is the temp file + rename every artefact writer uses (safetensors files, fused
  folders, analysis JSON and plots, image grids, the tiny world's reports): the artefacts are
  written under ``.NAME.PID.tmp`` beside their targets and renamed into place together only
  when all of them are complete, so a failure (an exception, Ctrl-C or SIGTERM) leaves the old
  files whole and no temp file behind; temp files of a killed run are recognised by their
  dead PID, named in a warning and removed;
- content hashes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from .errors import LoraMergeWarning, OutputPathError

PathLike = str | os.PathLike


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when two paths name one existing file (so an input is never overwritten)."""
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output(output: PathLike, inputs: Iterable[PathLike] = (), *, follow_symlinks: bool = False,
                 folder: bool = False, not_inside: Iterable[PathLike] = ()) -> Path:
    """Refuse an unusable output location; return the path to write (a followed symlink's target).

    Refused: one of ``inputs`` in any spelling; an existing target that is not a regular file;
    a symbolic link unless ``follow_symlinks``; for a ``folder`` output, one that exists or lies
    inside a folder of ``not_inside``; a parent folder that is missing or not writable.
    """
    output = Path(output)
    for source in inputs:
        if Path(source).resolve() == output.resolve() or same_file(source, output):
            raise OutputPathError(f"output would overwrite the input {source}", output)
    if os.path.islink(output):
        if not follow_symlinks:
            raise OutputPathError("output is a symbolic link; give --follow-symlinks to write to its target", output)
        output = output.resolve()
    for outer in not_inside:
        if Path(outer).is_dir() and inside(output, Path(outer)):
            raise OutputPathError(f"output lies inside the input folder {outer}; choose a path outside it", output)
    _check_kind(output, folder)
    _check_parent(output)
    return output


def _check_kind(output: Path, folder: bool) -> None:
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise output_error(exc, output) from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputPathError("output is a symbolic link; give --follow-symlinks to write to its target", output)
    if folder:
        raise OutputPathError("output folder already exists; choose a new path", output)
    if stat.S_ISDIR(st.st_mode):
        raise OutputPathError("output is a folder; give a file path", output)
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"output exists and is not a regular file ({_kind_name(st.st_mode)}); "
                              "loramerge replaces only regular files", output)


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _check_parent(output: Path) -> None:
    parent = output.parent
    if not parent.is_dir():
        raise OutputPathError(f"output directory {str(parent)!r} does not exist", output)
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output directory {str(parent)!r} is not writable", output)


def output_error(exc: OSError, path: PathLike) -> OutputPathError:
    """An OSError met while writing ``path`` as one line."""
    if exc.errno == errno.ENOSPC:
        return OutputPathError("no space left on device while writing", path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputPathError("output location is not writable", path)
    return OutputPathError(f"cannot write: {exc.strerror or exc}", path)


# --------------------------------------------------------------------------------------------
# temp files: named, registered, removed on failure and on SIGTERM, recognised when stale

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_live: set[Path] = set()  # temp files and folders this process is writing
_lock = threading.Lock()
_previous_handler = None


def temp_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.tmp"


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def _on_sigterm(signum, frame) -> None:
    """Remove this process's temp files, then die of SIGTERM as if no handler were set (or let
    the handler that was there before decide)."""
    previous = _previous_handler
    for path in list(_live):
        _remove(path)
    _live.clear()
    _restore_handler()
    if callable(previous):
        previous(signum, frame)
    else:
        os.kill(os.getpid(), signum)


def _register(paths: Sequence[Path]) -> None:
    global _previous_handler
    with _lock:
        if not _live and threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGTERM)
            if current is not _on_sigterm:
                _previous_handler = current
                signal.signal(signal.SIGTERM, _on_sigterm)
        _live.update(paths)


def _unregister(paths: Sequence[Path]) -> None:
    with _lock:
        _live.difference_update(paths)
        if not _live:
            _restore_handler()


def _restore_handler() -> None:
    global _previous_handler
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        previous = _previous_handler
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    _previous_handler = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a number no process has: leave it alone)
    return True


def sweep_stale(target: PathLike) -> list[Path]:
    """Temp files of ``target`` left by killed runs: removed when their PID is dead (named in a
    warning), named in a warning when another live process is writing them. Returns those removed."""
    target = Path(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent if str(target.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        found = _TEMP.match(entry.name)
        if not found or found["name"] != target.name or int(found["pid"]) == os.getpid():
            continue
        path, pid = target.parent / entry.name, int(found["pid"])
        if _pid_alive(pid):
            warnings.warn(f"{path}: a temp file of {target.name} that process {pid} is still writing "
                          "(another loramerge run?); left alone", LoraMergeWarning, stacklevel=2)
            continue
        _remove(path)
        removed.append(path)
        warnings.warn(f"{path}: removed a stale temp file left by a killed run (process {pid})",
                      LoraMergeWarning, stacklevel=2)
    return removed


class Staged:
    """Artefacts written under temp names and renamed into place together.

    ``with Staged([a, b]) as (tmp_a, tmp_b): …`` — write to the temp paths; on a clean exit
    every temp is renamed over its target (a failure before that leaves every target as it
    was); on an exception, Ctrl-C or SIGTERM every temp is removed. ``folder=True``: the targets
    are new folders (the temp path is not created; make it).
    """

    def __init__(self, targets: Sequence[PathLike], folder: bool = False):
        self.targets = [Path(t) for t in targets]
        self.folder = folder
        for target in self.targets:
            _check_kind(target, folder)
            _check_parent(target)
            sweep_stale(target)
        self.temps = [temp_path(t) for t in self.targets]
        _register(self.temps)
        self._open = True

    def commit(self) -> list[Path]:
        try:
            for target in self.targets:  # refuse before renaming anything
                _check_kind(target, self.folder)
            for tmp, target in zip(self.temps, self.targets):
                if self.folder:
                    os.rename(tmp, target)
                else:
                    os.replace(tmp, target)
        except OSError as exc:
            self.abort()
            raise output_error(exc, target) from None
        except BaseException:
            self.abort()
            raise
        self._close()
        return self.targets

    def abort(self) -> None:
        if self._open:
            for tmp in self.temps:
                _remove(tmp)
            self._close()

    def _close(self) -> None:
        _unregister(self.temps)
        self._open = False

    def __enter__(self) -> list[Path]:
        return self.temps

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif isinstance(exc, OSError) and not isinstance(exc, OutputPathError):
            self.abort()
            raise output_error(exc, self.targets[0]) from None
        else:
            self.abort()


def write_text(path: PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    with Staged([path]) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically write a binary file (an image made in memory)."""
    with Staged([path]) as (tmp,):
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
