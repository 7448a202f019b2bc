"""``python3 -m pkvm`` with its standard streams closed or full.

The output of a command is its tables on stdout: stdout closed (``>&-``) or full
(``> /dev/full``) is a failed run, exit 1, with one line that says which stream. stderr closed
(``2>&-``) or full changes no exit status: a usage error is still 2, a run that succeeds is
still 0 (its "wrote FILE" notes go nowhere). Before, a closed stdout was reported as "internal
error: AttributeError ... (a bug in pkvm)", a full one as a bare "[Errno 28] No space left on
device", and a usage error with stderr closed exited 1 (the error line's own write failed).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close=(), cwd=None):
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("PKVM_DEBUG", None)

    def closer():
        for fd in close:
            os.close(fd)

    return subprocess.run([sys.executable, "-m", "pkvm", *args], stdout=stdout, stderr=stderr, env=env,
                          preexec_fn=closer if close else None, cwd=cwd, timeout=120, check=False, text=True)


@pytest.mark.parametrize("args", [["costs"], ["workloads"], ["compare", "--memory", "16M", "-q"]])
def test_closed_stdout_is_a_failed_run_in_one_line(args):
    p = _run(args, stdout=None, close=(1,))
    assert p.returncode == 1, p.stderr
    assert p.stderr == "pkvm: error: cannot write to standard output: it is closed\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("args", [["costs"], ["compare", "--memory", "16M", "-q", "--json", "-"]])
def test_full_stdout_says_which_stream(args):
    with open("/dev/full", "w") as full:
        p = _run(args, stdout=full)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert lines[-1] == "pkvm: error: [Errno 28] cannot write to standard output: No space left on device", p.stderr
    assert "Traceback" not in p.stderr and sum(ln.startswith("pkvm: error") for ln in lines) == 1


def test_closed_stderr_keeps_the_exit_status(tmp_path):
    assert _run(["compare", "--memory", "x"], stderr=None, close=(2,)).returncode == 2
    assert _run(["compare", "--memory", "16M", "--json", "o.json"], stderr=None, close=(2,),
                cwd=tmp_path).returncode == 0
    assert (tmp_path / "o.json").stat().st_size > 0
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            assert _run(["compare", "--memory", "x"], stderr=full).returncode == 2
