"""Writing output files whole: a temporary file beside the target, renamed over it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator


def _writes_through(path: str) -> bool:
    """Whether ``path`` must be written in place rather than replaced by a rename: it exists
    and is not a regular file (``/dev/null``, a terminal, a pipe), or it is a regular file that
    only a kernel link reaches (``/dev/stdout`` redirected to a file: the name it resolves to is
    another file or none), or the file a standard stream of this process is writing to (renamed
    over, the stream would go on writing to the unlinked old file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return True
    try:
        resolved = os.stat(os.path.realpath(path))
    except OSError:
        return True
    if (resolved.st_dev, resolved.st_ino) != (st.st_dev, st.st_ino):
        return True
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fst = os.fstat(stream.fileno())
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def output_path(path: str | os.PathLike[str]) -> str:
    """The file writing ``path`` creates or replaces: ``path`` with every symbolic link
    resolved, so that a link named as an output keeps pointing where it did and its target gets
    the content (a dangling link creates its target)."""
    return os.path.realpath(path)


def check_creatable(path: str | os.PathLike[str]) -> None:
    """A dry run of :func:`atomic_output`'s first step: create (and remove at once) the
    temporary file it would write ``path`` through, so that a directory no file can be created
    in (a read-only file system, ``/proc``) is found before a run, not after it. Nothing is
    left behind.

    Raises:
        OSError: the temporary file cannot be created (``filename`` is the directory).
    """
    name = os.fspath(path)
    if _writes_through(name):
        return
    target = output_path(name)
    parent = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pkvm-", dir=parent)
    except PermissionError:
        if os.path.isfile(target) and os.access(target, os.W_OK):
            return  # atomic_output writes it in place
        raise
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, parent) from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[str]:
    """Yield the name to write ``path``'s content to; once the block completes, the content is
    ``path``'s in one step, and a block that raises leaves ``path`` as it was.

    A regular file (or a new one) is written as a temporary file in the directory of
    :func:`output_path` (``suffix``, default ``path``'s extension, ends its name, for writers
    that pick the format by it), given the mode a plainly created file would have (0666 less
    the umask) and renamed over that file: a reader sees the old file or the new one, never a
    part, and a symbolic link named as ``path`` stays a link to it. A device, a pipe or a file
    reached through a kernel link (see :func:`_writes_through`) is written in place once the
    block completes, as ``open(path, "w")`` would, from a temporary file in the system's
    temporary directory (writers that seek, a PNG's, cannot write a pipe themselves): beside
    it, the temporary file would be in ``/dev``, which only root may write, and the rename
    would replace the node itself.

    An existing regular file the user may write in a directory the user may not (no temporary
    file can go beside it) is written in place the same way.

    Raises:
        OSError: the temporary file cannot be created (the directory does not exist, or is not
            writable and the file is new or not writable) or renamed.
    """
    name = os.fspath(path)
    ext = os.path.splitext(name)[1] if suffix is None else suffix
    through = _writes_through(name)
    target = name if through else output_path(name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pkvm-", suffix=ext, dir=None if through else os.path.dirname(target))
    except PermissionError:
        # a file the user may write in a directory the user may not: written in place
        if through or not (os.path.isfile(target) and os.access(target, os.W_OK)):
            raise
        through = True
        fd, tmp = tempfile.mkstemp(prefix=".pkvm-", suffix=ext)
    os.close(fd)
    try:
        yield tmp
        if through:
            with open(tmp, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(tmp)
            return
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
