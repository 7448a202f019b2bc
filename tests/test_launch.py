"""Ctrl-C while the command line is still importing pkvm (pkvm._launch): one line and exit
status 130, as for a Ctrl-C during a run, not Python's traceback of the module being imported;
a program that imports pkvm keeps Python's KeyboardInterrupt."""

import os
import signal
import subprocess
import sys
import sysconfig

import pytest

from pkvm import _launch


def _interrupt_while_importing(cmd):
    """Start ``cmd`` (a Python command line with ``-X importtime``), send SIGINT once pkvm's
    import is under way (importtime has reported a pkvm submodule past ``pkvm._launch``: the
    package's guard ran), and return the exit status and the stderr lines that are not
    importtime's."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    sent = False
    for line in p.stderr:
        if "pkvm." in line and "pkvm._launch" not in line:
            p.send_signal(signal.SIGINT)
            sent = True
            break
    _, err = p.communicate(timeout=120)
    assert sent, "pkvm was never imported"
    return p.returncode, [line for line in err.splitlines() if not line.startswith("import time:")]


def test_ctrl_c_while_python_m_pkvm_imports_is_one_line():
    rc, err = _interrupt_while_importing([sys.executable, "-X", "importtime", "-m", "pkvm", "compare",
                                          "--memory", "16M", "-q"])
    assert (rc, err) == (130, ["pkvm: interrupted"])


def test_ctrl_c_while_the_pkvm_script_imports_is_one_line():
    script = os.path.join(sysconfig.get_path("scripts"), "pkvm")
    if not os.path.isfile(script):
        pytest.skip("the pkvm script is not installed next to this Python")
    rc, err = _interrupt_while_importing([sys.executable, "-X", "importtime", script, "compare", "--memory",
                                          "16M", "-q"])
    assert (rc, err) == (130, ["pkvm: interrupted"])


def test_a_program_that_imports_pkvm_keeps_its_keyboard_interrupt():
    """``python -c 'import pkvm; ...'``: Python's handler stays, so Ctrl-C is the program's
    KeyboardInterrupt (checked by raising SIGINT in the child once pkvm is imported)."""
    code = ("import signal, pkvm\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "try:\n    signal.raise_signal(signal.SIGINT)\nexcept KeyboardInterrupt:\n    print('caught')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (0, "caught\n", "")


@pytest.mark.parametrize("argv0, orig, main_file, expected", [
    ("-m", ["python3", "-m", "pkvm", "compare"], None, True),
    ("-m", ["python3", "-X", "importtime", "-m", "pkvm"], None, True),
    ("-m", ["python3", "-mpkvm"], None, True),
    ("-m", ["python3", "-m", "pkvm.__main__"], None, True),
    ("-m", ["python3", "-m", "mytool"], None, False),       # mytool imports pkvm while it is found
    ("-m", ["python3", "-m", "pkvmx"], None, False),
    ("/usr/bin/pkvm", ["python3", "/usr/bin/pkvm"], "/usr/bin/pkvm", True),
    ("/usr/bin/pkvm", ["python3", "/usr/bin/pkvm"], "/elsewhere/pkvm", False),
    ("tool.py", ["python3", "tool.py"], "tool.py", False),
    ("", ["python3"], None, False),                          # the interactive interpreter
])
def test_only_the_command_lines_process_is_the_command(monkeypatch, argv0, orig, main_file, expected):
    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(sys, "orig_argv", orig)
    main = type(sys)("__main__")
    if main_file is not None:
        main.__file__ = main_file
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert _launch._is_command() is expected


def test_guard_and_release(monkeypatch):
    """guard() installs its handler only in the command's process and only over Python's own;
    release() restores Python's, and leaves any other handler alone."""
    prev = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        monkeypatch.setattr(_launch, "_is_command", lambda: False)
        _launch.guard()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        monkeypatch.setattr(_launch, "_is_command", lambda: True)
        _launch.guard()
        assert signal.getsignal(signal.SIGINT) is _launch._interrupted
        with pytest.raises(SystemExit) as exc:
            signal.raise_signal(signal.SIGINT)
        assert exc.value.code == 130
        _launch.release()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        def other(signum, frame):
            pass

        signal.signal(signal.SIGINT, other)
        _launch.guard()  # someone else's handler: left alone
        assert signal.getsignal(signal.SIGINT) is other
        _launch.release()
        assert signal.getsignal(signal.SIGINT) is other
    finally:
        signal.signal(signal.SIGINT, prev)
