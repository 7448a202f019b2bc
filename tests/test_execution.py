"""The execution layer (pkvm.experiments.execution): a Dask LocalCluster gives exactly what a serial run
gives, a failing task is named with its configuration, an unreachable scheduler is one error."""

import contextlib
import json
import os
import signal
import time

import pytest

from pkvm import experiments as E
from pkvm.experiments.execution import (NoWorkersError, RunError, Runner, SchedulerUnreachableError,
                                        WorkerMismatchError)

SMALL = E.Config(memory="32M", workload="swiotlb", options={"ops": "30"})
POLICIES = ["fault-time", "eager-post"]


@pytest.fixture(scope="module")
def cluster():
    """One 2-worker LocalCluster for the module (starting one costs a few seconds)."""
    with Runner(jobs=2) as runner:
        yield runner


def _same(a, b):
    """Everything a run measured but the simulator's own wall time, and its full record."""
    def strip(d):
        d = dict(d)
        for k in ("wall_s", "gfns_per_s", "row"):
            d.pop(k, None)
        d["phases"] = [{k: v for k, v in p.items() if k != "wall_s"} for p in d["phases"]]
        return d

    return a.metrics(wall=False) == b.metrics(wall=False) and strip(a.to_dict()) == strip(b.to_dict())


def test_local_cluster_equals_serial_bit_for_bit(cluster):
    serial = E.sweep(SMALL, ["32M", "64M"], POLICIES, seed=4)
    seen = []
    farmed = E.sweep(SMALL, ["32M", "64M"], POLICIES, seed=4, runner=cluster,
                     progress=lambda label, f: seen.append((label, f)))
    assert [(r.config, r.seed) for r in farmed] == [(r.config, r.seed) for r in serial]
    assert all(_same(a, b) for a, b in zip(serial, farmed))
    assert sorted(seen) == sorted((f"{m} {p}", 1.0) for m in ("32M", "64M") for p in POLICIES)


def test_grid_on_the_cluster_equals_serial_and_tabulates(cluster):
    grid = {"memory": ["32M", "64M"], "vcpus": [1, 2]}
    serial = E.sweep_grid(SMALL, grid, POLICIES, seed=2)
    farmed = E.sweep_grid(SMALL, grid, POLICIES, seed=2, runner=cluster)
    assert all(_same(a, b) for a, b in zip(serial, farmed))
    frame = E.to_frame(farmed)
    assert len(frame) == 8
    assert list(frame[["memory", "vcpus", "policy"]].itertuples(index=False, name=None))[:3] == [
        (32 << 20, 1, "fault-time"), (32 << 20, 1, "eager-post"), (32 << 20, 2, "fault-time")]
    assert (frame["modeled_ns"] == [r.modeled_ns for r in serial]).all()


def test_a_failing_task_is_retried_then_named(cluster):
    """A run that raises on the worker (twice: it is deterministic) stops the batch with an
    error that names the run."""
    with pytest.raises(RunError, match=r"second run failed on the cluster \(tried twice\): ValueError: seed -1"):
        cluster.map(E.run, [(SMALL, 0), (SMALL, -1)], ["first run", "second run"])


def test_a_failing_run_is_named_with_its_configuration(cluster):
    """compare labels its runs by policy for the progress bar; an error names the whole config."""
    bad = SMALL.with_(workload="replay", options={"file": "/nonexistent/boom"})
    with pytest.raises(RunError, match=r"^snp 32M replay (fault-time|eager-post) file=/nonexistent/boom seed 0 "
                                       r"failed on the cluster \(tried twice\): ValueError: replay file "
                                       r"'/nonexistent/boom' does not exist$"):
        E.compare(bad, POLICIES, runner=cluster)


def test_a_failing_task_in_a_chunk_is_named(cluster):
    with pytest.raises(RunError, match=r"^c failed on the cluster"):
        cluster.map(E.run, [(SMALL, 0), (SMALL, 1), (SMALL, -1)], ["a", "b", "c"], chunksize=3)


def test_serial_runner_reports_fractions_and_keeps_order():
    seen = []
    with Runner() as runner:
        assert not runner.distributed and runner.describe() == "serially in-process"
        out = runner.map(pow, [(2, 5), (3, 2)], ["x", "y"], lambda label, f: seen.append((label, f)))
    assert out == [32, 9]
    assert seen == [("x", 1.0), ("y", 1.0)]


def test_unreachable_scheduler_is_one_error_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match=r"--scheduler tcp://127.0.0.1:9: no Dask scheduler answered within 1 s"):
        Runner(scheduler="tcp://127.0.0.1:9", connect_timeout=1).start()
    assert time.monotonic() - t0 < 15



@contextlib.contextmanager
def _scheduler_without_workers(adapt=False):
    """A real scheduler (in this process, on TCP) with no worker: a bare ``dask scheduler``,
    or (``adapt``) an adaptive cluster scaled to zero, which starts a worker for pending tasks."""
    import logging

    from distributed import LocalCluster

    # its HTTP server (started without a dashboard too) on a free port: the module's cluster has 8787
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.CRITICAL) as bare:
        if adapt:
            bare.adapt(minimum=0, maximum=1, interval="200ms")
        yield bare.scheduler_address


def test_a_scheduler_without_workers_is_one_error_within_the_timeout(monkeypatch, capsys):
    """``--scheduler`` of a scheduler that no worker joined waited for ever: the tasks were
    accepted and never ran. pkvm waits ``worker_timeout`` seconds for one, then fails the run
    (exit 1) in one line naming the scheduler."""
    import functools

    from pkvm import cli

    with _scheduler_without_workers() as address:
        t0 = time.monotonic()
        with pytest.raises(NoWorkersError, match=rf"^--scheduler {address}: the Dask scheduler there has no "
                                                 rf"workers \(none joined within 1 s\); start some with: dask "
                                                 rf"worker {address} --nthreads 1$"):
            Runner(scheduler=address, worker_timeout=1).start()
        assert time.monotonic() - t0 < 8
        monkeypatch.setattr(cli, "Runner", functools.partial(Runner, worker_timeout=1))
        assert cli.main(["compare", "--memory", "16M", "-q", "--policies", "fault-time", "--scheduler", address]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pkvm: error: --scheduler {address}: the Dask scheduler there has no workers")
        assert err.count("\n") == 1


def test_an_adaptive_cluster_scaled_to_zero_gets_a_worker_while_pkvm_waits():
    """The wait for a worker has a task pending: an adaptive cluster scales on its tasks, and
    one with no worker and nothing to do would never start one."""
    with _scheduler_without_workers(adapt=True) as address, Runner(scheduler=address, worker_timeout=8) as runner:
        assert runner.map(pow, [(2, 3)], ["a"]) == [8]



def test_workers_of_another_pkvm_are_refused(cluster, monkeypatch, capsys):
    """Workers with another pkvm (or Python, or Dask) than the client's computed with their
    own code without a word. Before it runs anything, the runner asks each worker for its
    environment() and refuses one line naming what differs: here the client says it is pkvm
    0.0.0-other, and the workers (processes of their own) are the real one."""
    import pkvm
    from pkvm.cli import main
    from pkvm.experiments.execution import environment

    cluster.start()
    address = cluster._cluster.scheduler_address
    with Runner(scheduler=address) as runner:  # the same pkvm everywhere: accepted
        assert runner.map(pow, [(2, 3)], ["a"]) == [8]
    monkeypatch.setattr(pkvm, "__version__", "0.0.0-other")
    assert environment()["pkvm"] == "0.0.0-other"
    with pytest.raises(WorkerMismatchError, match=rf"^--scheduler {address}: the workers do not run this pkvm, "
                                                  r"Python and Dask: pkvm 0\.1\.0 on tcp://\S+ \(and 1 more "
                                                  r"worker\), 0\.0\.0-other here; install the same on every "
                                                  r"worker$"):
        Runner(scheduler=address).start()
    assert main(["compare", "--memory", "16M", "-q", "--policies", "fault-time", "--scheduler", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pkvm: error: --scheduler {address}: the workers do not run this pkvm")
    assert err.count("\n") == 1


def test_a_worker_of_another_pkvm_that_joins_later_is_closed_before_it_runs_anything(capsys):
    """The workers were checked only when pkvm connected: one that joined later (an adaptive
    cluster scaling up) ran pkvm's tasks whatever pkvm it had. Now a worker plugin checks each
    joining worker before it reads a task and closes a mismatching one; the runner passes one
    line to ``notice`` and the runs go on on the others. Here the late worker's environment()
    says pkvm 0.0.0-other (the cluster runs in this process, so the check is patched after the
    runner connected). After close() the plugin is gone from the scheduler."""
    from distributed import LocalCluster, get_worker

    from pkvm.experiments import execution

    def where(x):
        return get_worker().address, x * 2

    notices = []
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=50) as lc:
        first = next(iter(lc.scheduler.workers))
        with Runner(scheduler=lc.scheduler_address, worker_timeout=5, notice=notices.append) as runner:
            real = execution.environment

            def other():
                return dict(real(), pkvm="0.0.0-other")

            execution.environment = other
            try:
                lc.scale(2)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and not runner._refused:
                    time.sleep(0.05)
                out = runner.map(where, [(i,) for i in range(6)], [str(i) for i in range(6)])
            finally:
                execution.environment = real
            assert [x for _, x in out] == [0, 2, 4, 6, 8, 10]
            assert {w for w, _ in out} == {first}  # the late worker ran none of them
            assert len(notices) == 1 and "\n" not in notices[0]
            assert notices[0].startswith(f"--scheduler {lc.scheduler_address}: closed the worker ")
            assert "that joined after pkvm connected: it does not run this pkvm, Python and Dask (pkvm " \
                   "0.0.0-other on " in notices[0] and notices[0].endswith("; it ran none of the runs")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(lc.scheduler.workers) != 1:
                time.sleep(0.05)
            assert list(lc.scheduler.workers) == [first]
            assert [n for n in lc.scheduler.worker_plugins if n.startswith("pkvm-environment-")]
        assert not [n for n in lc.scheduler.worker_plugins if n.startswith("pkvm-environment-")]
    # the command line's notice: one warning line on stderr
    from pkvm import cli

    cli._warning(notices[0])
    assert capsys.readouterr().err == f"pkvm: warning: {notices[0]}\n"


def test_a_check_left_by_a_runner_that_died_refuses_nothing():
    """A runner killed without close() leaves its plugin on the scheduler; the scheduler forgets
    the runner's sentinel task when its client goes, and the plugin then refuses no worker (a
    cluster upgraded later would otherwise lose every new worker). The cluster has no worker
    while the runner lives: the plugin's (faked) mismatch would close one there then, which
    depended on whether the scheduler had the sentinel yet when the worker's setup asked."""
    from distributed import Client, LocalCluster

    from pkvm.experiments import execution

    with LocalCluster(n_workers=0, processes=False, threads_per_worker=1, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=50) as lc:
        with Client(lc, set_as_default=False) as client:
            sentinel = client.submit(int, 0, key="pkvm-runner-dead", pure=False)
            client.register_plugin(execution._environment_check(dict(execution.environment(), pkvm="0.0.0-gone"),
                                                                 sentinel.key), name="pkvm-environment-dead")
            sentinel.release()
            del sentinel
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "pkvm-runner-dead" in lc.scheduler.tasks:
            time.sleep(0.05)
        lc.scale(2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(lc.scheduler.workers) != 2:
            time.sleep(0.05)
        time.sleep(0.3)
        assert len(lc.scheduler.workers) == 2 and "pkvm-environment-dead" in lc.scheduler.worker_plugins


def test_runs_left_with_no_worker_stop_within_the_timeout_instead_of_waiting_for_ever():
    """Every worker of the cluster went after pkvm connected (here: the one there leaves, and the
    one that joins instead runs another pkvm, so the late-worker check closes it): the runs
    waited for ever. Now map() gives up once the cluster has had no worker for
    ``worker_timeout`` seconds, with one line naming the scheduler and the runs still to run,
    after the notice of the refused worker; the runner still closes cleanly."""
    from distributed import LocalCluster

    from pkvm.experiments import execution

    notices = []
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=50) as lc:
        address = lc.scheduler_address
        with Runner(scheduler=address, worker_timeout=1, notice=notices.append) as runner:
            assert runner.map(pow, [(2, 3)], ["a"]) == [8]
            real = execution.environment
            execution.environment = lambda: dict(real(), pkvm="0.0.0-other")
            try:
                lc.scale(0)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and lc.scheduler.workers:
                    time.sleep(0.05)
                assert not lc.scheduler.workers
                lc.scale(1)  # joins, and is refused
                t0 = time.monotonic()
                with pytest.raises(NoWorkersError, match=rf"^--scheduler {address}: no worker left to run the 3 "
                                                         r"runs still to run \(none for 1 s: every worker left, died "
                                                         rf"or was refused\); start some with: dask worker {address} "
                                                         r"--nthreads 1$"):
                    runner.map(pow, [(2, 3), (3, 3), (4, 3)], ["a", "b", "c"])
                assert time.monotonic() - t0 < 15
            finally:
                execution.environment = real
        assert len(notices) == 1 and "closed the worker" in notices[0]
        assert not [n for n in lc.scheduler.worker_plugins if n.startswith("pkvm-environment-")]


def test_what_differs_between_client_and_workers_is_named():
    """Each differing value once, with the first worker that has it and how many more do."""
    from pkvm.experiments.execution import _mismatch, environment

    here = environment()
    assert set(here) >= {"pkvm", "pkvm sources", "python", "dask", "distributed", "cloudpickle", "numpy"}
    assert here["python"].count(".") == 2 and len(here["pkvm sources"]) == 12
    assert _mismatch(here, {"tcp://a:1": dict(here), "tcp://b:1": dict(here)}) is None
    other = dict(here, **{"pkvm sources": "0123456789ab"})
    older = {k: v for k, v in here.items() if k != "numpy"}
    assert _mismatch(here, {"tcp://b:1": other, "tcp://a:1": other, "tcp://c:1": older, "tcp://d:1": here}) == (
        f"pkvm sources 0123456789ab on tcp://a:1 (and 1 more worker), {here['pkvm sources']} here; "
        f"numpy missing on tcp://c:1, {here['numpy']} here")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"jobs": 0}, "jobs 0 must be a positive int"),
    ({"jobs": 2.0}, "jobs 2.0 must be a positive int"),
    ({"scheduler": " "}, "scheduler ' ' must be an address"),
    # each job is a worker process: jobs=99999 started (or tried to start) that many
    ({"jobs": 99999}, "jobs 99999 is more than .* worker processes \\(4 per CPU"),
    # malformed addresses failed on start() as "no Dask scheduler answered within 5 s" (exit 1)
    ({"scheduler": "nonsense"}, "scheduler 'nonsense' is not an address like tcp://host:8786 \\(missing port"),
    ({"scheduler": "http://127.0.0.1:1"}, "is not an address .*unknown address scheme 'http'"),
    ({"scheduler": "tcp://[::1]:99999"}, "is not an address .*port 99999 is not in 1..65535"),
    ({"scheduler": "tcp://h:0"}, "port 0 is not in 1..65535"),
    ({"scheduler": "tcp://127.0.0.1:x"}, "is not an address like tcp://host:8786"),
])
def test_bad_runner_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Runner(**kwargs)


def test_compare_refuses_bad_jobs_before_running():
    with pytest.raises(ValueError, match="jobs 0 must be a positive int"):
        E.compare(SMALL, jobs=0)


def test_cli_refuses_more_jobs_than_max_jobs(capsys):
    """``pkvm compare -j 99999`` is a usage error, one line, before any worker starts."""
    from pkvm.cli import main
    from pkvm.experiments.execution import max_jobs

    assert main(["compare", "--memory", "16M", "-j", str(max_jobs() + 1)]) == 2
    err = capsys.readouterr().err
    assert err == f"pkvm: error: -j/--jobs {max_jobs() + 1}: at most {max_jobs()} (4 worker processes per CPU)\n"
    Runner(jobs=max_jobs(), scheduler="tcp://127.0.0.1:9")  # a remote cluster's size is its own


@pytest.mark.parametrize("address", ["nonsense", "http://127.0.0.1:1", "tcp://[::1]:99999"])
def test_cli_refuses_a_malformed_scheduler_address(capsys, address):
    """A malformed --scheduler is a usage error (exit 2) saying what is wrong with it, at once;
    it was exit 1 with "no Dask scheduler answered within 5 s", a wait that never happened."""
    from pkvm.cli import main

    t0 = time.monotonic()
    assert main(["compare", "--memory", "16M", "--scheduler", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pkvm: error: --scheduler {address}: not an address like tcp://host:8786 (")
    assert err.count("\n") == 1 and "answered" not in err and time.monotonic() - t0 < 4


def test_cli_runs_on_an_existing_scheduler_and_refuses_a_workers_address(cluster, capsys, tmp_path):
    """``--scheduler`` reaches a real scheduler (pkvm asks it who it is first, within the
    timeout) and gives the serial run's counters; a worker's address, a server that answers in
    Dask's protocol but is not the scheduler, is a failed run in one line naming what answered."""
    from pkvm.cli import main

    cluster.start()
    address = cluster._cluster.scheduler_address
    argv = ["compare", "--memory", "16M", "-q", "--policies", "fault-time"]
    assert main([*argv, "--json", str(tmp_path / "serial.json")]) == 0
    assert main([*argv, "--scheduler", address, "--json", str(tmp_path / "farmed.json")]) == 0
    capsys.readouterr()
    counters = [json.loads((tmp_path / f"{n}.json").read_text())["results"][0]["counters"]
                for n in ("serial", "farmed")]
    assert counters[0] == counters[1]
    worker = next(iter(cluster._client.scheduler_info()["workers"]))
    assert main([*argv, "--scheduler", worker]) == 1
    err = capsys.readouterr().err
    assert err == (f"pkvm: error: --scheduler {worker}: the server there is a Dask Worker, not a Dask scheduler "
                   "(give the scheduler's address, e.g. tcp://host:8786)\n")



def test_the_header_says_where_the_runs_ran(cluster, capsys):
    """The sweep and sensitivity headers read "runs local Dask cluster of 2 worker processes"
    and "runs Dask cluster at tcp://..."; now "runs on a ..." / "runs on the ...", and
    "runs serially in-process" as before."""
    from pkvm.cli import _where, main

    cluster.start()
    address = cluster._cluster.scheduler_address
    sweep = ["sweep", "--grid", "vcpus=1", "--memory", "16M", "--policies", "fault-time", "-q"]
    sens = ["sensitivity", "--memory", "16M", "--policies", "fault-time", "--samples", "2", "--vary", "rmpupdate",
            "--metric", "counters.mmu_lock_held_ns", "-q"]
    for argv in (sweep, sens):
        for extra, where in (([], "runs serially in-process"),
                             (["--scheduler", address], f"runs on the Dask cluster at {address}")):
            assert main([*argv, *extra]) == 0
            out = capsys.readouterr().out
            assert where in out.splitlines()[0 if argv is sweep else 1], out
    assert _where(cluster) == "on a local Dask cluster of 2 worker processes"


# Ctrl-C on a terminal sends SIGINT to the whole foreground process group: pkvm and the local
# cluster's worker processes. The driver runs the CLI in a session of its own and says when the
# cluster is up; the test then signals the group, as a terminal would.
_CTRL_C_DRIVER = r"""
import os, subprocess, sys
import distributed
import pkvm.experiments.execution as ex
from pkvm.cli import main

start = ex.Runner.start
def patched(self):
    if sys.argv[1] == "start" and self._client is None:  # Ctrl-C while the cluster starts
        subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -INT -{os.getpgrp()}"])
    start(self)
    print("ready", flush=True)
ex.Runner.start = patched
sys.exit(main(["sensitivity", "--memory", "64M", "--workload", "mixed", "--option", "ops=100",
               "--metric", "counters.mmu_lock_held_ns", "--samples", "64", "-q", "-j", "2"]))
"""


@pytest.mark.parametrize("when", ["start", "run"])
def test_ctrl_c_with_jobs_is_one_line(when):
    """``pkvm sensitivity -j 2`` and Ctrl-C: exit 130 with ``pkvm: interrupted`` and nothing else.
    The worker processes printed a KeyboardInterrupt traceback each (Ctrl-C reaches them too),
    and Ctrl-C while the cluster started printed distributed's ``close_clusters`` traceback.
    A Ctrl-C during the start is lost now; the next one stops the run."""
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("PKVM_DEBUG", None)
    with subprocess.Popen([sys.executable, "-c", _CTRL_C_DRIVER, when], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, text=True, start_new_session=True) as p:
        try:
            # "start": the Ctrl-C during the start is lost, or (on a slow or a fast machine)
            # lands before it or after it and stops the run: either way, no "ready" or one
            if p.stdout.readline() == "ready\n":
                time.sleep(1.5)  # the runs are under way on the workers
                os.killpg(p.pid, signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert (p.returncode, err) == (130, "pkvm: interrupted\n")



def _sigint_bits(pid):
    """Whether process ``pid`` blocks SIGINT and whether it ignores it (/proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
    return {k: bool(int(status[k], 16) & (1 << (signal.SIGINT - 1))) for k in ("SigBlk", "SigIgn")}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/PID/status")
def test_a_worker_the_nanny_restarts_ignores_ctrl_c_too(capfd):
    """The local cluster's workers inherit an ignored SIGINT from its start; one that a nanny
    restarted later (after a crash, or the memory limit) did not, and died on the user's
    Ctrl-C with a KeyboardInterrupt traceback. Now it blocks SIGINT (inherited from the
    cluster's threads) and ignores it (a preload), and a SIGINT leaves it running, silent."""
    with Runner(jobs=2) as runner:
        client = runner._client
        before = set(client.run(os.getpid).values())
        assert all(_sigint_bits(pid)["SigIgn"] for pid in before)  # inherited from the start
        os.kill(min(before), signal.SIGKILL)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                pids = set(client.run(os.getpid).values())
                if len(pids) == 2 and pids != before:
                    break
            time.sleep(0.1)
        (new,) = pids - before
        assert _sigint_bits(new) == {"SigBlk": True, "SigIgn": True}
        os.kill(new, signal.SIGINT)
        time.sleep(1)
        assert new in client.run(os.getpid).values()
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_the_local_cluster_leaves_no_gc_callback_in_this_process(cluster):
    """The local cluster's scheduler runs in this process, and distributed's scheduler hooks a
    GC diagnosis into ``gc.callbacks`` (it only logs, and pkvm silences those logs). A
    KeyboardInterrupt raised while a gc callback runs is "ignored" by Python: about one Ctrl-C
    in four during ``pkvm sensitivity -j 2`` printed 'Exception ignored in: <bound method
    GCDiagnosis._gc_callback ...> KeyboardInterrupt' and the run went on."""
    import gc

    cluster.start()
    assert [cb for cb in gc.callbacks if "distributed" in getattr(cb, "__module__", "")] == []


def test_a_sigint_handler_not_installed_from_python_is_left_alone(monkeypatch):
    """signal.signal returns None for a handler installed by C code (an embedding
    application's); restoring None would raise TypeError after the cluster started. Such a
    handler is left as it is."""
    from pkvm.experiments import execution

    calls = []

    def fake_signal(signum, handler):
        if handler is None:
            raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
        calls.append(handler)
        return None

    monkeypatch.setattr(execution.signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(execution.signal, "signal", fake_signal)
    with execution._workers_ignore_sigint():
        pass
    assert calls == []



def test_a_local_cluster_that_cannot_start_is_a_run_error(monkeypatch, capsys):
    """LocalCluster failing to start (too few file descriptors: ``ulimit -n 28``; a script
    without ``if __name__ == "__main__":``, whose workers re-import it) raised distributed's
    RuntimeError("Nanny failed to start."), which the command line reported as "internal
    error ... (a bug in pkvm ...)". It is RunError (a PkvmError) naming the cluster, and a
    failed run, exit 1, on the command line."""
    import distributed

    from pkvm.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(distributed, "LocalCluster", broken)
    with pytest.raises(RunError, match=r"^could not start a local Dask cluster of 2 worker processes "
                                       r"\(RuntimeError: Nanny failed to start\.\)"):
        Runner(jobs=2).start()
    assert main(["compare", "--memory", "16M", "-q", "-j", "2"]) == 1
    assert capsys.readouterr().err == ("pkvm: error: could not start a local Dask cluster of 2 worker processes "
                                       "(RuntimeError: Nanny failed to start.)\n")


def _exit_on_a_worker(client_pid, status):
    """Kill the process running this task, unless it is the client's (a test of the client)."""
    import os

    if os.getpid() == client_pid:
        raise AssertionError("the task ran in the client process")
    os._exit(status)


def test_a_chunk_whose_worker_died_is_not_rerun_in_this_process():
    """A failed chunk was re-run here, task by task, to name the one that failed. When the
    failure is the worker's death (a crash of the core, the kernel's OOM killer), the re-run
    killed pkvm itself the same way: os._exit(3) in a task of a 2-task chunk ended the client
    with status 3 and no message. Now a chunk whose worker died is named as a chunk."""
    import os

    with Runner(jobs=2) as runner:
        with pytest.raises(RunError, match=r"^a \(or one of the 1 runs sent with it\) failed on the cluster "
                                           r"\(tried twice\): KilledWorker: "):
            runner.map(_exit_on_a_worker, [(os.getpid(), 3), (os.getpid(), 4)], ["a", "b"], chunksize=2)
        assert runner.map(pow, [(2, 5)], ["c"]) == [32]  # the nannies started new workers


def test_a_run_the_cluster_cancelled_or_lost_is_named_as_such(cluster):
    """When the scheduler goes away mid-run (or a task is cancelled), its futures end
    'cancelled': the error read 'sample 192 of ... (or one of the 63 runs sent with it)
    failed on the cluster (tried twice): NoneType: None', after re-running the chunk here.
    Now it says what happened, and re-runs nothing."""
    import threading

    cluster.start()
    client = cluster._client
    submitted = []
    submit = client.submit

    def recording(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    client.submit = recording
    try:
        timer = threading.Timer(0.8, lambda: submitted[3].cancel())
        timer.start()
        with pytest.raises(RunError, match=r"^t3 did not finish: the Dask cluster reports it cancelled \(the "
                                           r"connection to the scheduler was lost, or the task was cancelled\)$"):
            cluster.map(time.sleep, [(0.5,)] * 8, [f"t{i}" for i in range(8)], chunksize=1)
        timer.join()
    finally:
        del client.submit


def test_the_cluster_logs_nothing_on_the_command_line(cluster, capsys):
    """distributed configures 'distributed.client' at WARNING itself, so setting 'distributed'
    to CRITICAL left it out: a scheduler that went away mid-run printed 'distributed.client -
    ERROR -' and a 30-line traceback before pkvm's one line."""
    import logging

    from pkvm.cli import main

    cluster.start()
    assert main(["compare", "--memory", "16M", "-q", "--policies", "fault-time", "--scheduler",
                 cluster._cluster.scheduler_address]) == 0
    capsys.readouterr()
    for name in ("distributed", "distributed.client", "distributed.gc", "distributed.comm.tcp", "tornado.application"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.CRITICAL, name


def test_a_local_cluster_gets_no_more_workers_than_runs(capsys):
    """``-j 4`` for two runs started four worker processes, two of them idle; one run goes
    serially in-process (the helper audit of 2026-12-07 found the idle workers)."""
    from pkvm.cli import main

    base = ["sweep", "--grid", "memory=16M", "--memory", "16M", "-q", "-j", "4"]
    assert main([*base, "--policies", "fault-time,eager-post"]) == 0
    assert "runs on a local Dask cluster of 2 worker processes" in capsys.readouterr().out.splitlines()[0]
    assert main([*base, "--policies", "fault-time"]) == 0
    assert "runs serially in-process" in capsys.readouterr().out.splitlines()[0]


def test_a_ctrl_c_lost_in_c_code_still_stops_the_runs(monkeypatch):
    """Python raises KeyboardInterrupt wherever the main thread is; inside a callback from C
    code (scipy's Sobol set-up, a gc callback) it is reported as "Exception ignored" and lost.
    CI saw a ``pkvm sensitivity -j 2`` go on for a minute after a Ctrl-C lost in
    ``scipy.stats._sobol``. While a runner is entered, the Ctrl-C is also noted, its next task
    does not start, and the lost KeyboardInterrupt is not reported; afterwards the previous
    handler and hook are back."""
    import signal
    import sys

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: printed.append(a[0]))
    excepthook = sys.excepthook

    def unraisable(exc):
        return type("U", (), {"exc_type": type(exc), "exc_value": exc, "exc_traceback": None,
                              "err_msg": None, "object": None})()

    before = signal.getsignal(signal.SIGINT)
    ran = []
    with Runner(jobs=1) as r:
        other = unraisable(ValueError("another"))
        sys.unraisablehook(other)  # reported as before
        try:  # as C code loses it, reporting it as unraisable
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt as exc:
            sys.excepthook(KeyboardInterrupt, exc, None)  # Cython prints its traceback first
            sys.unraisablehook(unraisable(exc))
        sys.excepthook(ValueError, ValueError("x"), None)
        assert reported == [other]  # the lost Ctrl-C is not: the runner raises it again
        assert printed == [ValueError]
        with pytest.raises(KeyboardInterrupt):
            r.map(ran.append, [(1,), (2,)], ["a", "b"])
    assert ran == [] and signal.getsignal(signal.SIGINT) is before and sys.unraisablehook == reported.append
    assert sys.excepthook is excepthook
    with Runner(jobs=1) as r:  # a new runner starts afresh
        assert r.map(ran.append, [(1,)], ["a"]) == [None] and ran == [1]


def test_close_waits_for_the_plugin_s_unregister_at_most_the_connect_timeout(monkeypatch):
    """close() unregisters pkvm's worker plugin through distributed's public call, which has no
    timeout of its own: a scheduler that stops answering holds close() up for at most the
    connect timeout, and the client still closes."""
    from distributed import Client, LocalCluster

    calls = []

    def hangs(self, name, nanny=None):
        calls.append(name)
        time.sleep(30)

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=50) as lc:
        runner = Runner(scheduler=lc.scheduler_address, connect_timeout=2)
        assert runner.map(pow, [(2, 5)], ["a"]) == [32]
        client = runner._client
        monkeypatch.setattr(Client, "unregister_worker_plugin", hangs)
        t0 = time.monotonic()
        runner.close()
        assert time.monotonic() - t0 < 6
        assert len(calls) == 1 and calls[0].startswith("pkvm-environment-")
        assert client.status == "closed"
