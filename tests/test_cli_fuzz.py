"""The command line under arbitrary input: argument vectors and garbage trace and cost files
run through :func:`pkvm.cli.main` in-process.

Whatever the input, ``main()`` returns 0, 1 or 2; an error is exactly one line on stderr,
``pkvm: error: ...``, of printable text; no traceback ever reaches the user (``PKVM_DEBUG``
unset). Runs are kept small (64M guests, few operations) and the example counts are capped, so
the file runs in well under a minute under the ``ci`` profile too.
"""

import contextlib
import os
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkvm.cli import main

_CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"
_FUZZ = settings(max_examples=60 if _CI else 25, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values a user might type, right or wrong; all small enough to run in a fraction of a second.
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_SIZES = st.one_of(st.sampled_from(["64M", "32M", "16M", "-4G", "0", "3M", "1P", "64Q", "x", "", "2M", "1e3"]), _TEXT)
_POLICIES = st.sampled_from(["fault-time", "eager-post", "6.8", "6.11", "6.19", "tdx-huge-pages", "rfc-v8",
                             "6.19+gmem_max_order=9", "6.19+bogus=1", "eager-locked", "nope"])
_OPTIONS = st.sampled_from(["ops=10", "ops=abc", "ops=-1", "ops=0x8", "accept=4K", "accept=2M", "accept=3K",
                            "touches=0", "prealloc=yes", "prealloc=maybe", "file=nonexistent.txt", "=1", "x",
                            "cycles=1", "fraction=0.1", "fraction=2", "chunk=4K"])
_COSTS = st.sampled_from(["rmpupdate=800ns", "rmpupdate=1e30s", "rmpupdate=1e400", "rmpupdate=-1",
                          "rmpupdat=1", "npf_fault=2us", "remote_tlb_flush.slope=1us", "x", "rmpupdate=nan"])


_WORKLOAD_OPTIONS = {"boot": ["accept=4K", "prealloc=1"], "swiotlb": ["ops=8", "touches=0"],
                     "balloon": ["cycles=1", "fraction=0.1"], "virtio": ["cycles=1", "devices=1"]}


@st.composite
def _argv(draw):
    """Mostly well-formed command lines with one or two things wrong (or none), so that the
    checks after parsing and the runs themselves are reached too."""
    cmd = draw(st.sampled_from(["compare", "run", "run", "costs", "workloads", "bogus", ""]))
    argv = [cmd] if cmd else []
    if cmd in ("compare", "run"):
        argv += ["--memory", draw(st.one_of(st.sampled_from(["64M", "32M"]), _SIZES))]
        wl = draw(st.sampled_from(["boot", "swiotlb", "balloon", "virtio", "replay:nope.txt", "replay:", "nope"]))
        argv += ["--workload", wl]
        if wl in _WORKLOAD_OPTIONS:
            argv += ["-o", draw(st.sampled_from(_WORKLOAD_OPTIONS[wl]))]
        if cmd == "compare" and draw(st.booleans()):
            argv += ["--policies", draw(st.sampled_from(["fault-time", "6.19", "6.16,6.19"]))]
    for _ in range(draw(st.integers(0, 3))):
        opt = draw(st.sampled_from(["--platform", "--policy", "--policies", "--option", "--cost", "--seed",
                                    "--vcpus", "--image", "--sweep-memory", "--shared-backing", "--layout",
                                    "--json", "--trace", "--trace-max-size", "--costs", "--no-discard", "-q",
                                    "--toml", "--markdown", "--bogus", "-j", "--host-cpus", "--timeline",
                                    "--gantt", "--trace-events", "--batch-pages"]))
        value = {
            "--platform": st.sampled_from(["snp", "tdx", "sw_protected", "sev", "SNP"]),
            "--policy": _POLICIES, "--policies": st.lists(_POLICIES, min_size=1, max_size=2).map(",".join),
            "--option": _OPTIONS, "--cost": _COSTS,
            "--seed": st.sampled_from(["0", "1", "-1", "x", "99999999999999999999"]),
            "--vcpus": st.sampled_from(["1", "2", "0", "-2", "4096", "x"]),
            "--image": _SIZES, "--sweep-memory": st.sampled_from(["32M,64M", "64M,64M", "x", "32M,", "-1G"]),
            "--shared-backing": st.sampled_from(["thp", "4k", "hugetlb-1g", "huge"]),
            "--layout": st.sampled_from(["rows", "auto", "diagonal"]),
            "--json": st.sampled_from(["@TMP/out.json", "/nonexistent/dir/out.json", "@TMP"]),
            "--trace": st.sampled_from(["@TMP/t.txt", "/nonexistent/t.txt"]),
            "--trace-max-size": st.sampled_from(["1G", "1K", "x", "-1"]),
            "--costs": st.sampled_from(["@TMP/garbage", "@TMP", "/nonexistent.toml"]),
            "-j": st.sampled_from(["1", "0", "x"]),
            "--host-cpus": st.sampled_from(["1", "2", "64", "0", "x"]),
            "--batch-pages": st.sampled_from(["512", "1", "3", "0", "x", "2147483648"]),
            "--timeline": st.sampled_from(["@TMP/tl.json", "/nonexistent/tl.json"]),
            "--gantt": st.sampled_from(["@TMP/g.png", "@TMP/g.bogus"]),
            "--trace-events": st.sampled_from(["kvm_page_fault", "kvm_page_fault,nope", "", "x\ny"]),
        }.get(opt)
        argv.append(opt)
        if value is not None:
            argv.append(draw(value))
    if draw(st.integers(0, 4)) == 0:
        argv.append(draw(_TEXT))  # a stray word, maybe with control characters
    return argv


def _run(capsys, argv, tmp):
    argv = [a.replace("@TMP", tmp) for a in argv]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    if code:
        lines = err.splitlines()
        errors = [ln for ln in lines if ln.startswith("pkvm: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)
        assert errors[0].isprintable(), (argv, err)
        assert "internal error" not in errors[0] and "[Errno" not in errors[0], (argv, err)
    return code, out, err


@_FUZZ
@given(argv=_argv(), garbage=st.binary(max_size=200))
def test_argument_vectors(capsys, monkeypatch, argv, garbage):
    """Any argument vector: exit 0/1/2, one printable error line, never a traceback."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "garbage"), "wb") as f:
            f.write(garbage)
        _run(capsys, argv, tmp)


_TRACE_LINES = st.one_of(
    st.sampled_from([
        "cpus=2", "# pkvm version=0 platform=snp memory=67108864 image=2097152 vcpus=1",
        "# pkvm memory=x", "# pkvm platform=tdx",
        "  CPU 0/KVM-7 [000] 1.0: kvm_page_fault: vcpu 0 rip 0x0 address 0x1000 error_code 0x2000500000000",
        "  CPU 0/KVM-7 [000] 1.0: kvm_page_fault: vcpu 0 rip 0x0 address -1 error_code 0x2",
        "  CPU 0/KVM-7 [000] 1.0: kvm_page_fault: vcpu 0 rip 0x0 address 0x10000000000000000 error_code 0x2",
        "  CPU 0/KVM-7 [000] 1.0: kvm_page_fault: vcpu 9 rip 0x0 address 0x1000 error_code 0x2",
        "  CPU 0/KVM-7 [000] 1.0: kvm_page_fault: vcpu 0 rip 0x0 address zz error_code 0x2",
        "qemu-system-x86-6 [000] 1.0: kvm_vm_set_mem_attributes: 0x0000000000000000 -- 0x0000000000000010 [0x8]",
        "qemu-system-x86-6 [000] 1.0: kvm_vm_set_mem_attributes: 0x0000000000000010 -- 0x0000000000000000 [0x8]",
        "qemu-system-x86-6 [000] 1.0: kvm_vm_set_mem_attributes: 0xffffffffffffffff -- 0x0 [0x8]",
        "qemu-system-x86-6 [000] 1.0: sys_enter_fallocate: fd: 0x00000005, mode: 0x00000003, "
        "offset: 0x0000000000000000, len: 0x0000000000001000",
        "qemu-system-x86-6 [000] 1.0: kvm_userspace_exit: reason KVM_EXIT_HYPERCALL (3)",
        "qemu-system-x86-6 [000] 1.0: some_other_event: whatever",
        "hello", "", "# a comment", "\x00\x01",
    ]),
    _TEXT,
)


@_FUZZ
@given(lines=st.lists(_TRACE_LINES, max_size=8), platform=st.sampled_from(["snp", "tdx", "sw_protected"]))
def test_garbage_traces(capsys, monkeypatch, lines, platform):
    """A replay of any text: it runs (0), stops at a named line (1) or is refused as not a trace
    or a bad header (2); one line either way."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.txt")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write("\n".join(lines))
        code, out, err = _run(capsys, ["run", "--memory", "64M", "--platform", platform, "--workload",
                                       f"replay:{path}", "-q"], tmp)
        if not any(": kvm_" in ln or ": sys_enter_" in ln for ln in lines) and not any(
                ln.startswith("# pkvm ") for ln in lines):
            assert code == 2 and ("not a trace" in err or "empty" in err or "binary" in err), (lines, err)


@_FUZZ
@given(body=st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"1", b"[]", b"{}", b"null", b'{"profile": "arm"}', b'{"host": []}', b'{"overrides": {"rmpupdate": 1e400}}',
    b'{"overrides": {"rmpupdate": "1e30s"}}', b'{"costs": {"rmpupdate": {"value_ns": -1}}}', b'{"costs": 5}',
    b'{"format": 2}', b'{"overrides": {"rmpupdate": "800ns"}}', b"[[[[[[[[[[[[[[[[[[[[", b"\xff\xfe",
    b'host = "arm"', b"host = []", b"[overrides]\nrmpupdate = 1e400", b"[overrides]\nrmpupdate = \"800ns\"",
    b"# only a comment\n", b"profile = 3"])), ext=st.sampled_from([".json", ".toml", ""]))
def test_garbage_cost_files(capsys, monkeypatch, body, ext):
    """``pkvm costs --costs FILE`` with any file content: 0 for a model, else exit 2 with one
    line that names the file."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c" + ext)
        with open(path, "wb") as f:
            f.write(body)
        code, out, err = _run(capsys, ["costs", "--costs", path], tmp)
        assert code in (0, 2), err
        if code:
            assert path in err or "cost model data" in err, err


@pytest.mark.parametrize("argv, message", [
    (["run", "--memory", "64M", "--workload", "replay:nonexistent.txt"],
     "--workload replay:nonexistent.txt: no such file"),
    (["run", "--memory", "64M", "--platform", "tdx", "--option", "accept=4K"],
     "option accept=4K: a TDX guest accepts 1G, then 2M, then 4K"),
    (["run", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=abc"],
     "option ops='abc': expected a non-negative integer such as 5000"),
    (["run", "--memory", "-4G"], "argument --memory: '-4G' is not a size like 4K"),
    (["compare", "--memory", "2G", "--sweep-memory", "1G"], "--memory 2G and --sweep-memory 1G both set"),
    (["compare", "--memory", "64M", "--platform", "tdx", "--policies", "fault-time,eager-locked"],
     "policy 'fault-time' cannot run on a tdx VM ('fault-time' is an snp design"),
    (["run", "--memory", "64M", "--policy", "tdx-huge-pages"], "policy 'tdx-huge-pages' cannot run on an snp VM"),
    (["run", "--memory", "64M", "--policy", "6.8"], r"policy '6.8' cannot run on an snp VM"),
    (["costs", "--cost", "rmpupdate=1e30s"], "bad duration '1e30s' for 'rmpupdate=1e30s': must be between 0 ns"),
    (["costs", "--cost", "rmpupdate=1e400"], "bad duration '1e400'"),
    (["run", "--policy", "a\nb"], "unknown policy preset 'a\\nb'"),
    (["run", "--memory", "64M", "--policy", ""], "unknown policy preset ''"),  # ran the default policy
    # the last one silently won, where --range and --grid refuse a name given twice
    (["run", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=10", "--option", "ops=20"],
     "--option gives ops twice (ops=10 and ops=20)"),
    (["run", "--memory", "64M", "--cost", "rmpupdate=1us", "--cost", "rmpupdate=2us"],
     "--cost gives rmpupdate twice (rmpupdate=1us and rmpupdate=2us)"),
    (["costs", "--cost", "npf_fault=1us", "--cost", "npf_fault=1us"], "--cost gives npf_fault twice"),
    # was replayed, then failed with exit 1 advising '--platform xyz', an option value that does not exist
    (["run", "--workload", "replay:@TMP/xyz.txt"],
     "--workload replay:@TMP/xyz.txt: its '# pkvm' header's platform='xyz' is not one of snp, tdx, sw_protected"),
    (["run", "--bogus\x1b[31m"], "unrecognized arguments: --bogus\\x1b[31m"),
    (["run", "--memory", "64M", "--workload", "replay:@TMP/rec.txt", "--platform", "tdx"],
     "--platform tdx: the trace @TMP/rec.txt was recorded with platform snp; a replay runs the VM its trace"),
    (["run", "--memory", "128M", "--workload", "replay:@TMP/rec.txt"],
     "--memory 128M: the trace @TMP/rec.txt was recorded with memory 64M"),
    (["compare", "--sweep-memory", "64M,128M", "--workload", "replay:@TMP/rec.txt"],
     "--sweep-memory 64M,128M: a replay runs at the memory its trace @TMP/rec.txt was recorded with (64M)"),
    (["run", "--memory", "64M", "--image", "12K", "--policy", "6.19+gmem_max_order=9"],
     "image 12K must be a multiple of 2M under policy '6.19+gmem_max_order=9'"),
    (["run", "--memory", "64M", "--trace", "@TMP/t.txt", "--trace-max-size", "1K"],
     "more than --trace-max-size 1K; pass --trace-max-size 1G to write it"),
    # a workload that does not fit was a run failure (exit 1), found only once the run built it
    (["run", "--memory", "64M", "--image", "62M", "--workload", "migration", "-o", "buffers=4M"],
     "which 64M of RAM with a 62M image does not leave: give more memory (Config(memory=...), --memory), a smaller image"),
    (["run", "--memory", "64M", "--workload", "virtio", "-o", "ring=1T"],
     "the workload needs a 1T private region"),
    (["run", "--memory", "64M", "--workload", "virtio", "-o", "devices=60000"],
     "no private 256K region left in 64M of RAM: give more memory (Config(memory=...), --memory)"),
])
def test_user_errors_exit_2_with_one_line(capsys, monkeypatch, tmp_path, argv, message):
    """The issue's cases: each is a usage error (exit 2), one line naming the argument."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    (tmp_path / "rec.txt").write_text("cpus=2\n# pkvm version=0 platform=snp memory=67108864 image=2097152 "
                                      "vcpus=1 policy=fault-time workload=boot\n")
    (tmp_path / "xyz.txt").write_text("cpus=2\n# pkvm version=0 platform=xyz memory=67108864\n")
    code, out, err = _run(capsys, argv, str(tmp_path))
    assert code == 2
    assert message.replace("@TMP", str(tmp_path)) in err
    assert err.count("\n") == 1


def test_policy_6_8_message_has_no_python_hint(capsys):
    """The command line speaks in options, not in Python calls."""
    assert main(["run", "--memory", "64M", "--policy", "6.8"]) == 2
    err = capsys.readouterr().err
    assert "Policy.preset" not in err and "snp policies: 6.11, 6.16, 6.19" in err


def test_run_help_mentions_only_its_own_flags(capsys):
    """``run --help`` does not mention --sweep-memory or --policies, which run rejects."""
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--sweep-memory" not in out and "--policies" not in out and "--trace-max-size" in out


def test_replay_of_garbage_is_refused_not_run(capsys, tmp_path):
    """A two-line text file, random bytes, an empty file and a TOML file are refused (exit 2),
    not replayed as an empty trace into a normal-looking table."""
    for name, body in (("two.txt", b"hello\nworld\n"), ("rand.bin", bytes(range(256))), ("empty.txt", b""),
                       ("c.toml", b'[overrides]\nrmpupdate = "800ns"\n')):
        path = tmp_path / name
        path.write_bytes(body)
        assert main(["run", "--memory", "64M", "--workload", f"replay:{path}"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and f"--workload replay:{path}: {path}" in err


def test_trace_size_is_stated_before_writing(capsys, tmp_path):
    """--trace prints the size it will write; the estimate is within 5 % of what it wrote."""
    path = tmp_path / "t.txt"
    assert main(["run", "--memory", "64M", "--trace", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("writing about ") and err[0].endswith(f"of trace to {path}")
    assert err[-1] == f"wrote trace {path}"
    mb = float(err[0].split()[2])
    assert abs(mb * 1e6 - path.stat().st_size) <= 0.05 * path.stat().st_size + 1e5


def test_unexpected_errors_are_one_line_unless_pkvm_debug(capsys, monkeypatch):
    """A bug in pkvm is one line that says so; PKVM_DEBUG=1 lets the traceback through."""
    import pkvm.cli as cli

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "_cmd_workloads", boom)
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    # The handler was bound when the parser was built: rebuild it with the patched one.
    assert main(["workloads"]) == 1
    err = capsys.readouterr().err
    assert err == ("pkvm: error: internal error: RuntimeError: simulated bug (a bug in pkvm; run with "
                   "PKVM_DEBUG=1 for the traceback and report it)\n")
    monkeypatch.setenv("PKVM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="simulated bug"):
        main(["workloads"])


def test_costs_help_toml_and_vm_docstring_cite_docs_costs_md(capsys):
    """``costs --help``, the TOML header and the ``VM`` docstring cite docs/costs.md, a file in
    the repository, not the house spec."""
    import pkvm

    assert main(["costs", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert main(["costs", "--toml"]) == 0
    toml_head = capsys.readouterr().out.split("\nformat")[0]
    for text in (help_text, toml_head, pkvm.VM.__doc__):
        assert "docs/costs.md" in text and "spec/" not in text


_REC = ("cpus=2\n# pkvm version=0 platform=snp memory=67108864 image=2097152 vcpus=1 policy=fault-time "
        "workload=boot\n")


@pytest.mark.parametrize("argv, message", [
    (["run", "--workload", "replay:rec.txt", "--trace", "rec.txt"],
     "--trace rec.txt: would overwrite rec.txt, which the run reads (--workload replay:rec.txt)"),
    (["run", "--workload", "replay:rec.txt", "--json", "./rec.txt"],
     "--json ./rec.txt: would overwrite ./rec.txt, which the run reads (--workload replay:rec.txt)"),
    (["compare", "--workload", "replay:rec.txt", "--policies", "fault-time", "--timeline", "rec.txt"],
     "--timeline rec.txt: would overwrite rec.txt"),
    (["compare", "--workload", "replay:rec.fault-time.txt", "--policies", "fault-time,eager-post",
      "--trace", "rec.txt"], "--trace rec.txt: would overwrite rec.fault-time.txt"),
    (["run", "--memory", "64M", "--costs", "c.toml", "--json", "c.toml"],
     "--json c.toml: would overwrite c.toml, which the run reads (--costs c.toml)"),
    (["sensitivity", "--memory", "64M", "--policies", "fault-time", "--costs", "c.toml", "--plot", "c.toml"],
     "--plot c.toml: would overwrite c.toml"),
    (["run", "--memory", "64M", "--json", "x.json", "--timeline", "x.json"],
     "--timeline x.json and --json x.json would both write x.json"),
    (["compare", "--memory", "64M", "--policies", "fault-time,eager-post", "--trace", "t.txt", "--json",
      "t.eager-post.txt"], "--trace t.txt and --json t.eager-post.txt would both write t.eager-post.txt"),
    (["sweep", "--memory", "64M", "--grid", "vcpus=1", "--out", "o.csv", "--json", "o.csv"],
     "--out o.csv and --json o.csv would both write o.csv"),
])
def test_outputs_never_overwrite_an_input_or_each_other(capsys, monkeypatch, tmp_path, argv, message):
    """Writing the trace being replayed (or the cost file read) truncated it before the replay
    read it: the input was lost and the run failed; two outputs naming one file kept only the
    last written. Both are refused before anything runs, and the files are left as they were."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("rec.txt", "rec.fault-time.txt"):
        (tmp_path / name).write_text(_REC)
    (tmp_path / "c.toml").write_text('[overrides]\nrmpupdate = "800ns"\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = _run(capsys, argv, str(tmp_path))
    assert (code, err.count("\n")) == (2, 1), err
    assert message in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _null_device(path):
    """A character device like /dev/null at ``path`` (mknod needs root: skip without it)."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    return str(path)


def test_outputs_may_share_a_device(capsys, monkeypatch, tmp_path):
    """A device is no file to protect: any number of outputs may name it."""
    monkeypatch.chdir(tmp_path)
    null = _null_device(tmp_path / "null")
    code, out, err = _run(capsys, ["run", "--memory", "64M", "--json", null, "--timeline", null], str(tmp_path))
    assert code == 0, err


@pytest.mark.parametrize("argv", [
    ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "--json", "@DEV"],
    ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "--out", "@DEV.csv"],
    ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "--plot", "@DEV.png"],
    ["run", "--memory", "64M", "--timeline", "@DEV"],
    ["run", "--memory", "64M", "--gantt", "@DEV.png"],
])
def test_outputs_write_through_a_device_and_a_pipe(capsys, monkeypatch, tmp_path, argv):
    """An output written whole (a temporary file renamed over the target) replaced a device
    node named as the output with a regular file: as root, ``pkvm sweep --json /dev/null``
    turned /dev/null into a file. A device or a pipe is written through, as open() would."""
    import threading

    monkeypatch.chdir(tmp_path)
    dev = [a for a in argv if a.startswith("@DEV")][0].replace("@DEV", str(tmp_path / "null"))
    _null_device(dev)
    code, out, err = _run(capsys, [a.replace("@DEV", str(tmp_path / "null")) for a in argv], str(tmp_path))
    assert code == 0, err
    assert stat.S_ISCHR(os.stat(dev).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    fifo = str(tmp_path / "pipe") + os.path.splitext(dev)[1]
    os.mkfifo(fifo)
    got = []

    def read():
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    code, out, err = _run(capsys, [a.replace("@DEV", str(tmp_path / "pipe")) for a in argv], str(tmp_path))
    reader.join(60)
    assert code == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and got and got[0]


_EVERY_OUTPUT = [
    ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "--json", "@OUT.json"],
    ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "--out", "@OUT.csv"],
    ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "--plot", "@OUT.png"],
    ["run", "--memory", "64M", "--json", "@OUT.json"],
    ["run", "--memory", "64M", "--timeline", "@OUT.json"],
    ["run", "--memory", "64M", "--gantt", "@OUT.png"],
]


def _out_name(argv):
    return os.path.splitext([a for a in argv if a.startswith("@OUT")][0])[1]


@pytest.mark.parametrize("argv", _EVERY_OUTPUT)
def test_a_pipe_in_a_directory_the_user_cannot_write(capsys, monkeypatch, tmp_path, argv):
    """Each output went through a temporary file beside the target, even a pipe or a device
    it then wrote through: as a user other than root, ``pkvm sweep --json /dev/stdout`` failed
    with "Permission denied: '/dev/.pkvm-...'" (exit 1) since only root may create files in
    /dev. A pipe or a device is written in place, and nothing is created beside it. (Root may
    create files anywhere: the test refuses them in the pipe's directory itself.)"""
    import tempfile as _tempfile
    import threading

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    locked = tmp_path / "locked"
    locked.mkdir()
    fifo = str(locked / "pipe") + _out_name(argv)
    os.mkfifo(fifo)
    mkstemp = _tempfile.mkstemp

    def refuse_locked(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == str(locked):
            raise PermissionError(13, "Permission denied", os.path.join(dir, ".pkvm-xxxxxxxx"))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(_tempfile, "mkstemp", refuse_locked)
    got = []

    def read():
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code, out, err = _run(capsys, [a.replace("@OUT" + _out_name(argv), fifo) for a in argv], str(tmp_path))
    finally:
        if not got:  # nothing opened the pipe to write: let the reader go
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(60)
    assert code == 0, err
    assert got and got[0]
    assert sorted(p.name for p in locked.iterdir()) == [os.path.basename(fifo)]


def test_sweep_json_to_dev_stdout_as_a_user(tmp_path):
    """The issue's command as an unprivileged user (nobody), in a child process: ``pkvm sweep
    ... --json /dev/stdout`` with stdout a pipe writes the JSON after the table and exits 0.
    The child cannot import what it has not imported yet (the interpreter's files may be root's
    alone), so the same command runs once first as root, to a file."""
    import json as _json
    import pwd

    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    nobody = pwd.getpwnam("nobody")
    argv = ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1", "-q"]
    assert main([*argv, "--json", str(tmp_path / "warm.json")]) == 0
    r, w = os.pipe()
    os.fchown(w, nobody.pw_uid, nobody.pw_gid)  # the pipe is the user's, as a shell's would be
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.dup2(w, 1)
            errfd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(errfd, 2)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.chdir("/")
            import sys

            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            code = main([*argv, "--json", "/dev/stdout"])
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    text = data.decode()
    got, want = _json.loads(text[text.index("{"):]), _json.loads((tmp_path / "warm.json").read_text())
    assert got["command"][-2:] == ["--json", "/dev/stdout"]
    assert [r["modeled_ns"] for r in got["results"]] == [r["modeled_ns"] for r in want["results"]]


@pytest.mark.parametrize("argv", _EVERY_OUTPUT)
def test_an_output_named_by_a_symbolic_link_writes_its_target(capsys, monkeypatch, tmp_path, argv):
    """The rename of the temporary file replaced a symbolic link named as an output with a
    regular file, and the file it pointed to kept its old content. The link's target is written
    (a dangling link's target is created) and the link stays."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    ext = _out_name(argv)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ("old" + ext)).write_text("old")
    os.symlink("data/old" + ext, "link" + ext)
    os.symlink("data/new" + ext, "dangling" + ext)
    for link, target in (("link" + ext, "data/old" + ext), ("dangling" + ext, "data/new" + ext)):
        code, out, err = _run(capsys, [a.replace("@OUT" + ext, link) for a in argv], str(tmp_path))
        assert code == 0, err
        assert os.readlink(link) == target
        assert os.path.getsize(target) > 100
        assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["new" + ext, "old" + ext]


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("argv", _EVERY_OUTPUT)
def test_a_link_to_a_missing_directory_is_a_usage_error(capsys, monkeypatch, tmp_path, argv):
    """A dangling link whose target's directory does not exist cannot be written: refused
    before anything runs (it was replaced by a regular file), naming the option."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    ext = _out_name(argv)
    flag = argv[argv.index("@OUT" + ext) - 1]
    os.symlink("nowhere/x" + ext, "link" + ext)
    code, out, err = _run(capsys, [a.replace("@OUT" + ext, "link" + ext) for a in argv], str(tmp_path))
    assert (code, err.count("\n")) == (2, 1), err
    assert (f"{flag} link{ext}: a symbolic link to {tmp_path}/nowhere/x{ext}, which cannot be created: "
            f"directory {tmp_path}/nowhere does not exist") in err
    assert os.listdir(tmp_path) == ["link" + ext] and os.path.islink("link" + ext)


@pytest.mark.parametrize("argv, message", [
    (["run", "--workload", "replay:rec.txt", "--json", "link.txt"],
     "--json link.txt: would overwrite link.txt, which the run reads (--workload replay:rec.txt)"),
    (["run", "--workload", "replay:link.txt", "--trace", "rec.txt"],
     "--trace rec.txt: would overwrite rec.txt, which the run reads (--workload replay:link.txt)"),
    (["run", "--memory", "64M", "--costs", "c.toml", "--timeline", "c-link.toml"],
     "--timeline c-link.toml: would overwrite c-link.toml, which the run reads (--costs c.toml)"),
    (["run", "--memory", "64M", "--json", "dangling.json", "--timeline", "new.json"],
     "--timeline new.json and --json dangling.json would both write new.json"),
])
def test_a_link_to_an_input_or_another_output_is_refused(capsys, monkeypatch, tmp_path, argv, message):
    """The clash checks compare the files paths resolve to: a symbolic link to the trace being
    replayed, to the cost file, or to another output's file is refused, and nothing changes."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rec.txt").write_text(_REC)
    (tmp_path / "c.toml").write_text('[overrides]\nrmpupdate = "800ns"\n')
    os.symlink("rec.txt", "link.txt")
    os.symlink("c.toml", "c-link.toml")
    os.symlink("new.json", "dangling.json")
    before = {p.name: (p.is_symlink(), os.readlink(p) if p.is_symlink() else p.read_bytes())
              for p in tmp_path.iterdir()}
    code, out, err = _run(capsys, argv, str(tmp_path))
    assert (code, err.count("\n")) == (2, 1), err
    assert message in err
    assert {p.name: (p.is_symlink(), os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in tmp_path.iterdir()} == before


_RUN, _COMPARE = ["run", "--memory", "64M"], ["compare", "--memory", "64M", "--policies", "6.19"]
_SWEEP = ["sweep", "--memory", "64M", "--policies", "6.19", "--grid", "vcpus=1"]


@pytest.mark.parametrize("command", ["run", "compare", "sweep", "sensitivity"])
def test_a_plot_without_an_extension_is_a_usage_error(capsys, monkeypatch, tmp_path, command):
    """``--plot p``: matplotlib drew a PNG to ``p.png`` while pkvm said it wrote ``p`` (run,
    compare), or, through the temporary file, left ``p`` empty and the PNG in a hidden
    ``.pkvm-*.png`` (sweep, sensitivity). Refused before anything runs."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = {"run": _RUN, "compare": _COMPARE, "sweep": _SWEEP,
            "sensitivity": ["sensitivity", "--memory", "64M", "--policies", "6.19", "--samples", "2"]}[command]
    code, out, err = _run(capsys, [*argv, "--plot", "p"], str(tmp_path))
    assert (code, err.count("\n")) == (2, 1), err
    assert "--plot p: name the format with an extension, e.g. p.png" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, flag", [(c, f) for c in (_RUN, _COMPARE) for f in
                                           ("--json", "--plot", "--trace", "--timeline", "--gantt")]
                         + [(_COMPARE, "--out"), (_SWEEP, "--json"), (_SWEEP, "--plot"), (_SWEEP, "--out")])
def test_an_empty_output_name_is_a_usage_error(capsys, monkeypatch, tmp_path, command, flag):
    """``--json ''`` ran and then failed (exit 1, "No such file or directory: ''"); ``--plot ''``
    wrote a file called ``.png``; ``--timeline ''`` and ``--gantt ''`` wrote nothing and said
    nothing. Each is refused before anything runs."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, [*command, flag, ""], str(tmp_path))
    assert (code, err.count("\n")) == (2, 1), err
    assert f"pkvm: error: {flag} needs a file name" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [_RUN, _COMPARE])
def test_a_failed_json_write_keeps_the_old_file_and_names_the_new(capsys, monkeypatch, tmp_path, command):
    """run and compare wrote --json with open(path, "w"): a write that failed (ENOSPC) left the
    previous file truncated to a part, and the error ("[Errno 28] No space left on device")
    did not say which file. Written whole now, as sweep writes it: the old file survives."""
    import errno
    import json as _json

    import pkvm.cli as cli

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o.json").write_text('{"old": 1}\n')

    def full(obj, f, **kw):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli.json, "dump", full)
    code = main([*command, "--json", "o.json"])
    err = capsys.readouterr().err
    assert code == 1 and err == "pkvm: error: [Errno 28] cannot write o.json: No space left on device\n"
    assert _json.loads((tmp_path / "o.json").read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--workload", "replay:@TMP/rec.txt", "--policies", "6.19", "--grid", "platform=tdx,snp"],
     "--grid platform=tdx,snp: the trace @TMP/rec.txt was recorded with platform snp; a replay runs the VM its "
     "trace recorded (leave platform out of --grid)"),
    (["sweep", "--workload", "replay:@TMP/rec.txt", "--policies", "6.19", "--grid", "memory=64M,128M"],
     "--grid memory=64M,128M: the trace @TMP/rec.txt was recorded with memory 64M"),
])
def test_a_replay_grid_over_its_recorded_shape_is_a_usage_error(capsys, monkeypatch, tmp_path, argv, message):
    """``sweep --grid platform=...`` over a replay ran, and failed (exit 1) with the replay's
    advice "run with --platform snp"; a --grid memory failed the same way. Refused before
    anything runs, as --platform and --memory are."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    (tmp_path / "rec.txt").write_text(_REC)
    code, out, err = _run(capsys, argv, str(tmp_path))
    assert (code, err.count("\n")) == (2, 1), err
    assert message.replace("@TMP", str(tmp_path)) in err


def test_a_trace_platform_error_reaching_the_cli_speaks_in_options(capsys, monkeypatch):
    """The Python API words a replay's platform mismatch with Config(platform=...); should one
    reach the command line (directly or as a cluster run's cause), it is a usage error worded
    in its options instead."""
    from pkvm import experiments
    from pkvm.errors import TracePlatformError
    from pkvm.experiments.execution import RunError

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    api = TracePlatformError("t.txt", "tdx", "snp", "replay it with Config(platform='tdx')")
    unknown = TracePlatformError("t.txt", "xyz", "snp", "Config(platform=...)")
    for raised, want in ((api, "--workload replay:t.txt: the trace is from a tdx VM, not snp (a replay runs on "
                                "the platform its trace recorded, tdx)"),
                         (unknown, "--workload replay:t.txt: the trace is from a xyz VM, not snp (--platform is "
                                   "one of snp, tdx, sw_protected)")):
        for cluster in (False, True):
            def fail(*args, raised=raised, cluster=cluster, **kwargs):
                if cluster:
                    raise RunError("snp fault-time failed on the cluster (tried twice)") from raised
                raise raised
            monkeypatch.setattr(experiments, "run", fail)
            code, _, err = _run(capsys, ["run", "--memory", "64M"], "")
            assert (code, err) == (2, f"pkvm: error: {want}\n")


@pytest.mark.parametrize("argv, message", [
    (["run", "--memory", "64M", "--workload", "mixed", "-o", "ops=100000000000000000000"],
     "option ops='100000000000000000000': 100000000000000000000 is more than 10^9; expected an integer from 0 to "
     "10^9"),
    (["compare", "--memory", "64M", "--workload", "virtio", "-o", "queues=2000"],
     "option queues='2000': 2000 is more than 1024; expected an integer from 0 to 1024"),
    (["sweep", "--memory", "64M", "--workload", "balloon", "-o", "cycles=1000000", "--grid", "vcpus=1"],
     "option cycles='1000000': 1000000 is more than 10^5"),
    (["run", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=1000000000", "-o", "touches=1000000"],
     "options ops=1000000000 x touches=1000000: the run would repeat its innermost step 1000000000000000 times, "
     "more than 10^9; lower one of them"),
])
def test_a_count_that_would_run_for_years_is_a_usage_error(capsys, monkeypatch, argv, message):
    """``pkvm run --workload mixed -o ops=10**20`` was accepted and ran (for years): refused
    before anything runs, exit 2, naming the option and the range."""
    from pkvm import experiments

    def ran(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    for name in ("run", "run_many", "compare", "sweep_grid"):
        monkeypatch.setattr(experiments, name, ran)
    code, out, err = _run(capsys, argv, "")
    assert (code, err.count("\n")) == (2, 1), err
    assert message in err


def test_a_config_error_from_a_cluster_run_is_a_usage_error(capsys, monkeypatch):
    """On a cluster the failing run arrives as a RunError whose cause is the worker's error: a
    ConfigError there is still the user's (exit 2), any other cause a failed run (exit 1)."""
    import pkvm
    from pkvm import experiments
    from pkvm.experiments.execution import RunError

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    for cause, want in ((pkvm.ConfigError("the workload needs a 1T private region"), 2),
                        (ValueError("something else broke"), 1)):
        def fail(*args, cause=cause, **kwargs):
            raise RunError("snp fault-time failed on the cluster (tried twice)") from cause
        monkeypatch.setattr(experiments, "run", fail)
        code, _, err = _run(capsys, ["run", "--memory", "64M"], "")
        assert code == want, err
