"""Audit the command line's answers to bad input, flag by flag.

For every subcommand of ``pkvm`` and every option it takes, runs :func:`pkvm.cli.main` (in this
process) with a small valid command plus that option set to bad values of every kind: empty,
blank, negative, huge, non-numeric, wrong units (``1X``), floats where counts go, non-ASCII
digits, a NUL byte, unknown choices, and, for options that name files, a missing file, a
directory, an empty, binary or malformed (JSON, TOML, trace) file, a FIFO, a dangling link, a
link loop, ``/dev/null``, a file under ``/proc``. Options with a syntax of their own (``--option``
for every workload option, ``--cost``, ``--range``, ``--grid``, ``--policies``, ``--metric``,
``--scheduler`` ...) get values of that syntax that are wrong.

A case passes when it exits 0, or exits 1 or 2 with exactly one line on stderr,
``pkvm: error: ...``, printable, with no traceback and no "internal error". A case that runs
longer than ``--budget`` seconds is reported as slow. Prints every failure and a summary;
``--accepted`` also lists the bad values that exited 0, to review by eye. Exit status 1 if any
case failed.

    python3 bench/cli_audit.py                 # every subcommand (about half an hour on 2 cores)
    python3 bench/cli_audit.py run costs       # some of them
    python3 bench/cli_audit.py --accepted run  # and list what was accepted

Not part of the test run: ``tests/test_cli_fuzz.py`` (hypothesis) and ``tests/test_cli_*.py``
keep what this found. Process-level cases (closed or full standard streams, a scheduler that
never answers) are in ``tests/test_cli_streams.py`` and ``tests/test_cli_scheduler.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
from typing import Any

from pkvm.cli import build_parser, main
from pkvm.experiments import workloads

_OUTPUT_FLAGS = ("--json", "--plot", "--trace", "--timeline", "--gantt", "--out")
_GENERIC = ["", " ", "-1", "0", "-0", "1X", "x", "nan", "inf", "-inf", "1e3", "1.5", "0x10",
            "99999999999999999999999999", "18446744073709551616", "\x00", "\u0665", "\U0001F600", "a,b", ",",
            "=", "-", "--x", "A" * 3000, "1,2,", "64G,x"]
_SIZES = ["1X", "64Q", "-4G", "0", "1P", "16E", "99999999999999999999G", "1.5G", "64 G", "3M", "1K"]
_BASE = {"compare": ["compare", "--memory", "16M", "-q"], "run": ["run", "--memory", "16M", "-q"],
         "sweep": ["sweep", "--grid", "memory=16M", "-q"],
         "sensitivity": ["sensitivity", "--memory", "16M", "--samples", "2", "-q", "--policies", "fault-time"],
         "costs": ["costs"], "workloads": ["workloads"], "policies": ["policies"]}
_TRACE_HEADER = "# pkvm version=0 platform=snp memory=67108864 image=2097152 vcpus=1\n"


class _Slow(BaseException):
    """Raised by the alarm: not an Exception, so that main() does not report it."""


def _files(d: str) -> dict[str, str]:
    """Input files of every kind, (re)made in ``d`` (an output case may have overwritten one)."""
    def put(name: str, data: str | bytes) -> str:
        p = os.path.join(d, name)
        with open(p, "wb" if isinstance(data, bytes) else "w", encoding=None if isinstance(data, bytes) else "utf-8") as f:
            f.write(data)
        return p

    files = {
        "missing": os.path.join(d, "nope", "x.json"), "missing2": os.path.join(d, "nofile.txt"), "dir": d,
        "empty": put("empty.txt", ""), "binary": put("bin.dat", bytes(range(256)) * 4),
        "badjson": put("bad.json", '{"a": '), "jsonlist": put("list.json", "[1,2]"),
        "badtoml": put("bad.toml", "x = = 1"), "nul": put("nul.txt", "\x00" * 100), "devnull": os.devnull,
        "headeronly": put("hdr.txt", _TRACE_HEADER),
        "badheader": put("badhdr.txt", "# pkvm version=0 platform=snp memory=x image=-1 vcpus=0\n"),
        "hugeheader": put("bighdr.txt", "# pkvm version=0 platform=snp memory=999999999999999999999999 "
                          "image=2097152 vcpus=99999999999\nqemu-1 [000] 1.0: kvm_vm_set_mem_attributes: 0x0 -- 0x10 [0x8]\n"),
        "truncated": put("trunc.txt", _TRACE_HEADER + "qemu-1 [000] 1.0: kvm_vm_set_mem_attributes: 0x00000 -- 0x0"),
        "badrange": put("badvals.txt", "qemu-1 [000] 1.0: kvm_vm_set_mem_attributes: 0x10 -- 0x0 [0x8]\n"),
        "jsontrace": put("jt.json", json.dumps({"traceEvents": []})),
    }
    if os.path.isdir("/proc/self"):
        files["proc"] = "/proc/self/status"
    for name, make in (("fifo", os.mkfifo), ("loop", None), ("dangling", None)):
        p = os.path.join(d, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        if make is not None:
            make(p)
        else:
            os.symlink(p if name == "loop" else os.path.join(d, "nowhere", "x"), p)
        files[name] = p
    return files


def _values(action: argparse.Action, files: dict[str, str]) -> list[str]:
    opt = action.option_strings[-1]
    vals = list(_GENERIC)
    if getattr(action.type, "__name__", "") == "_size":
        vals += _SIZES
    if opt == "--costs" or opt in _OUTPUT_FLAGS:
        vals += [p for k, p in files.items() if not (opt in _OUTPUT_FLAGS and k == "fifo")]  # no reader: blocks
    if opt == "--workload":
        vals += ["replay:" + p for p in files.values()] + ["replay:", "replay", "REPLAY:x", "Boot"]
    if opt == "--option":
        for wl in workloads.WORKLOADS.values():
            for name in wl.options:
                vals += [f"{name}={v}" for v in ("", "-1", "x", "1X", "1e400", "nan", "99999999999999999999", "3K")]
        vals += ["bogus=1", "=1", "ops=1=2"]
    if opt == "--cost":
        vals += [f"rmpupdate={v}" for v in ("", "-1", "x", "1X", "1e400s", "nanns", "infs", "800 ns")]
        vals += ["nope=1ns", "=1ns"]
    if opt == "--range":
        vals += [f"rmpupdate={v}" for v in ("", "1ns..", "..1ns", "2us..1us", "x..y", "nan..inf", "-1ns..1us")]
        vals += ["nope=1ns..2ns"]
    if opt == "--grid":
        vals += [f"{k}={v}" for k in ("memory", "vcpus", "platform", "workload", "discard", "image", "bogus")
                 for v in ("", "x", "-1", "0", "1,1", "16M,", "99999999999999999999")]
    if opt in ("--policies", "--policy"):
        vals += ["nope", "fault-time,fault-time", "6.19+bogus=1", "6.19+gmem_max_order=x", "fault-time+"]
    if opt == "--metric":
        vals += ["nope", "counters", "counters.nope", "seed", "vcpus", "policy"]
    if opt == "--vary":
        vals += ["nope", "rmpupdate.slope"]
    if opt == "--trace-events":
        vals += ["nope", "kvm_page_fault,", "KVM_PAGE_FAULT"]
    if opt == "--sweep-memory":
        vals += ["16M,16M", "16M,x", "16M,-1"]
    if opt == "--scheduler":
        vals += ["tcp://", "foo:bar", "tcp://host:notaport", "xyz://1.2.3.4:1", "tcp://:8786", "tcp://[::1"]
    return list(dict.fromkeys(vals))


def _run(argv: list[str], budget: int) -> tuple[Any, str]:
    err = io.StringIO()
    signal.alarm(budget)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code: Any = main(argv)
    except _Slow:
        code = "slow"
    except BaseException as exc:  # noqa: BLE001 - anything main() let out is a failure
        code = f"raised {type(exc).__name__}"
    finally:
        signal.alarm(0)
    return code, err.getvalue()


def _verdict(code: Any, err: str) -> str | None:
    """None if the answer is right, else what is wrong with it."""
    if code == 0:
        return None
    if not isinstance(code, int) or code not in (1, 2):
        return f"exit {code}"
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith("pkvm: error: ")]
    wrong = []
    if "Traceback" in err:
        wrong.append("traceback")
    if len(errors) != 1 or lines[-1] != errors[0]:
        wrong.append(f"{len(lines)} lines on stderr")
    elif not errors[0].isprintable():
        wrong.append("unprintable")
    elif "internal error" in errors[0]:
        wrong.append("internal error")
    return ", ".join(wrong) or None


def audit(commands: list[str], budget: int, accepted: bool) -> int:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    tmp = tempfile.mkdtemp(prefix="pkvm-cli-audit-")
    inputs = os.path.join(tmp, "in")
    os.makedirs(inputs)
    os.chdir(tmp)  # outputs named by bad values ('x', '-1', ...) land here
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Slow()))
    cases = failed = 0
    for cmd, sp in sub.choices.items():
        if commands and cmd not in commands:
            continue
        for action in sp._actions:
            if not action.option_strings or "-h" in action.option_strings:
                continue
            opt = action.option_strings[-1]
            takes = action.nargs in (None, "+") and action.const is None and not isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if not takes:
                argvs = [[*_BASE[cmd], opt, opt], [*_BASE[cmd], opt + "=x"]]
            elif opt == "--grid":
                argvs = [[cmd, opt, v, *_BASE[cmd][3:]] for v in _values(action, _files(inputs))]
            else:
                argvs = [[*_BASE[cmd], opt, v] for v in _values(action, _files(inputs))] + [[*_BASE[cmd], opt]]
            for argv in argvs:
                _files(inputs)
                code, err = _run(argv, budget)
                cases += 1
                wrong = _verdict(code, err)
                shown = " ".join(repr(a) if not a or " " in a or not a.isprintable() else a for a in argv)[:160]
                if wrong:
                    failed += 1
                    print(f"FAIL  {shown}\n      {wrong}: {err.strip()[-300:]!r}", flush=True)
                elif accepted and code == 0 and argv[:len(_BASE[cmd])] == _BASE[cmd]:
                    print(f"ok 0  {shown}", flush=True)
    for argv in ([], ["bogus"], ["Compare"]):
        code, err = _run(argv, budget)
        cases += 1
        if _verdict(code, err) or code == 0:
            failed += 1
            print(f"FAIL  {argv!r}: exit {code}, {err.strip()!r}")
    print(f"{cases} cases, {failed} failed (inputs and stray outputs in {tmp})")
    return 1 if failed else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commands", nargs="*", help="subcommands to audit (default: all)")
    ap.add_argument("--budget", type=int, default=30, help="seconds per case before it counts as slow")
    ap.add_argument("--accepted", action="store_true", help="also list the bad values that exited 0")
    a = ap.parse_args()
    os.environ.pop("PKVM_DEBUG", None)
    sys.exit(audit(a.commands, a.budget, a.accepted))
