"""Every file the package writes goes through :func:`atomic_path`: nothing half-written ever takes a final name.

Standard library only, so that any layer (the network's ``save_pretrained`` included) may use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temporary file or folder (created 0600/0700) the mode a plain ``open``/``mkdir`` would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _replace_folder(tmp: Path, path: Path) -> None:
    """Sync a finished temporary folder and put it at ``path``; a folder or link there is moved aside first
    and put back if the rename fails."""
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            _fsync(f)
            follow_umask(f)
    follow_umask(tmp, directory=True)
    old = None
    if path.is_symlink() or path.is_dir():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None:
            os.replace(old, path)
        raise
    if old is None:
        return
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", directory: bool = False) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` for the block to write (and verify); then rename it into place.

    On a normal exit the temporary file (or every file of the temporary folder, ``directory=True``)
    is synced to disk, given the mode the umask asks for, and renamed over ``path``. If the block
    raises, the temporary is removed and ``path`` keeps what it had. ``suffix`` ends the temporary
    name (some writers pick the format from it, e.g. ``".nii.gz"``). An existing folder at ``path``
    is replaced whole (the caller decides whether it may be). A write that fails for a full disk
    names ``path``, not the temporary.

        >>> with atomic_path("out/plans.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.filename is None and e.errno is not None:  # a short write names no file: name the one we were writing
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
            raise
        try:
            if directory:
                _replace_folder(tmp, path)
            else:
                _fsync(tmp)
                follow_umask(tmp)
                os.replace(tmp, path)
        except OSError as e:  # name the target the user gave, not our temporary
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if directory:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
