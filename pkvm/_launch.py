"""Ctrl-C while the ``pkvm`` command line is still starting: one line, exit status 130.

``python -m pkvm`` imports the package (and the ``pkvm`` script imports :mod:`pkvm.cli`)
before :func:`pkvm.cli.main` can catch anything, and that takes a few tenths of a second
(numpy, the typed core, the op tables). A Ctrl-C then printed Python's traceback of whatever
module was being imported. The package's first statement calls :func:`guard`, which, in the
command line's process only, makes SIGINT print ``pkvm: interrupted`` and exit with status 130
(what :func:`pkvm.cli.main` does for a Ctrl-C during a run); :func:`pkvm.cli.main` calls
:func:`release` first thing, which gives SIGINT back to Python's handler. A program that
imports pkvm (``import pkvm``, ``python -m mytool``) is left alone: its Ctrl-C raises
``KeyboardInterrupt`` as usual.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

__all__ = ["guard", "release"]

#: The exit status of a command line stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED_EXIT = 130

_SCRIPT_NAMES = ("pkvm", "pkvm.exe", "pkvm-script.py")


def _is_command() -> bool:
    """True in the process of ``python -m pkvm ...`` or of the installed ``pkvm`` script,
    while it starts: ``sys.argv[0]`` is ``"-m"`` while ``-m``'s module is being found
    (``sys.orig_argv`` says which), and the script's own path otherwise."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-m":
        orig = list(getattr(sys, "orig_argv", ()))
        for i, a in enumerate(orig[1:], 1):
            if a == "-m":
                return orig[i + 1:i + 2] in (["pkvm"], ["pkvm.__main__"])
            if a.startswith("-m"):  # -mpkvm
                return a[2:] in ("pkvm", "pkvm.__main__")
        return False
    if os.path.basename(argv0) not in _SCRIPT_NAMES:
        return False
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is not None and os.path.abspath(path) == os.path.abspath(argv0)


def _interrupted(signum: int, frame: Any) -> None:
    err = sys.stderr
    if err is not None:  # started with stderr closed (2>&-): the status says it
        try:
            print("pkvm: interrupted", file=err, flush=True)
        except (OSError, ValueError):
            pass
    raise SystemExit(INTERRUPTED_EXIT)


def guard() -> None:
    """In the command line's process, from the main thread, and over Python's own SIGINT
    handler only: Ctrl-C prints one line and exits 130 until :func:`release`."""
    if not _is_command():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # ignored, or a handler someone else installed
    try:
        signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread
        pass


def release() -> None:
    """Python's SIGINT handler again, if :func:`guard` installed its own."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
