"""Writing output files whole: a temporary file in the target's directory, renamed over it."""

from __future__ import annotations

import os
import shutil
import stat


def publish(tmp: str, path: str) -> None:
    """Give ``tmp`` (from ``tempfile.mkstemp``, created 0600) the mode a plainly created file
    would have (0666 less the umask), then rename it over ``path`` in one step: a reader sees
    the old file or the new one, never a part, and the new one is as readable as ``open(path,
    "w")`` would have made it.

    A ``path`` that exists and is not a regular file (``/dev/null``, ``/dev/stdout``, a pipe)
    is written through instead, as ``open(path, "w")`` would: renamed over, the device node
    itself would be replaced by a regular file."""
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    if special:
        with open(tmp, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(tmp)
        return
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
