"""One execution layer for every batch of runs: serial in-process, or on ``dask.distributed``.

:func:`pkvm.experiments.compare`, :func:`~pkvm.experiments.sweep`,
:func:`~pkvm.experiments.sweep_grid` and :func:`~pkvm.experiments.sensitivity` hand their
runs to a :class:`Runner`. A run is a pure function of its arguments (a
:class:`~pkvm.experiments.Config` and a seed), so where it runs cannot change what it returns:

- ``Runner(jobs=1)`` with no scheduler runs the tasks one after another in this process (no
  cluster to start; the progress callback sees each run's fraction done);
- ``Runner(jobs=N)`` (N > 1) starts a ``distributed.LocalCluster`` of N worker processes
  with one thread each, and closes it on exit;
- ``Runner(scheduler="tcp://host:8786")`` connects to an existing cluster, waits up to
  :data:`WORKER_TIMEOUT_S` seconds for it to have a worker, refuses workers that run another
  pkvm (version or sources), Python or Dask than this process (:func:`environment`), closes
  such a worker that joins later before it runs anything (a worker plugin; ``notice`` gets
  one line), and leaves the cluster running on exit.

On a cluster every task is submitted with one retry (a worker that dies or a task that fails
is tried once more), and results come back in submission order. A task that fails twice
stops the batch with :class:`RunError`, which names the task's configuration.

>>> with Runner(jobs=1) as runner:
...     runner.map(pow, [(2, 10), (3, 3)], ["a", "b"])
[1024, 27]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import resource_tracker
from types import TracebackType
from typing import Any

import pkvm
from pkvm.errors import PkvmError

__all__ = ["CONNECT_TIMEOUT_S", "NoWorkersError", "RunError", "Runner", "SchedulerUnreachableError",
           "WORKER_TIMEOUT_S", "WorkerMismatchError", "check_address", "environment", "max_jobs"]

#: Seconds to wait for an existing Dask scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 5.0

#: Seconds to wait, once an existing scheduler answered, for at least one worker to join it
#: (a bare ``dask scheduler``, or a cluster whose workers are still starting).
WORKER_TIMEOUT_S = 30.0

# While runs are out: how often to look for finished ones, and how often to ask the scheduler
# whether it still has a worker (Runner._as_completed).
_POLL_S = 0.02
_WORKER_POLL_S = 1.0


class RunError(PkvmError):
    """A task failed (on a cluster: twice, the retry included); the message names its
    configuration and the original error, which is also the ``__cause__``. Also: the local
    cluster of ``jobs=N`` could not start (its error is the ``__cause__``)."""


class SchedulerUnreachableError(PkvmError, OSError):
    """``--scheduler ADDRESS`` did not answer within :data:`CONNECT_TIMEOUT_S` seconds (the
    connection was refused, the host not found, or the server never answered), or what
    answered is not a Dask scheduler (a server of another protocol, a worker). The address
    itself was well-formed (:func:`check_address`): the command line reports this as a failed
    run, exit status 1, not as a usage error."""


class NoWorkersError(PkvmError):
    """``--scheduler ADDRESS`` answered, but no worker joined its cluster within
    :data:`WORKER_TIMEOUT_S` seconds: the tasks would wait for ever. (The connection was lost
    while waiting is :class:`SchedulerUnreachableError`.) Also from :meth:`Runner.map`, when
    the cluster has had no worker for that long while runs were out: every worker left, died
    for good, or was refused by the check of workers that join later. A failed run on the
    command line, exit status 1."""


class WorkerMismatchError(PkvmError):
    """A worker of ``--scheduler ADDRESS`` runs another pkvm (its version, or the digest of its
    sources), Python or Dask than this process (:func:`environment`), or cannot tell (it cannot
    import pkvm, or a pkvm too old to answer): its runs would not be this pkvm's. Raised on
    entry, for the workers there then; a mismatching worker that joins later is closed before
    it runs anything and reported through the runner's ``notice`` (:class:`Runner`). A failed
    run on the command line, exit status 1."""


#: The libraries whose versions a worker must share with this process (with Python's): the
#: ones Dask needs the same on both ends, and numpy, which the runs compute with.
_SHARED_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack", "numpy")


def environment() -> dict[str, str]:
    """What a worker must share with this process for its runs to be this process's runs:
    ``pkvm`` (the version), ``pkvm sources`` (a digest of the package's ``.py``, ``.pxi`` and
    ``.pxd`` files: another checkout of the same version differs there), ``python`` and the
    versions of :data:`_SHARED_PACKAGES`. Computed afresh (a few milliseconds): on the client,
    and on each worker through ``Client.run``."""
    from distributed.versions import get_package_info

    root = os.path.dirname(os.path.abspath(pkvm.__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".pxi", ".pxd")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    out = {"pkvm": str(pkvm.__version__), "pkvm sources": digest.hexdigest()[:12]}
    out.update((k, str(v)) for k, v in get_package_info(_SHARED_PACKAGES).items())
    out["python"] = platform.python_version()
    return out


def _mismatch(here: dict[str, str], workers: dict[str, dict[str, str]]) -> str | None:
    """What differs between this process's :func:`environment` and the workers', in a few
    words (``pkvm 0.2.0 on tcp://w:1 (and 1 more worker), 0.1.0 here; ...``); None when nothing does."""
    parts = []
    for key, mine in here.items():
        odd: dict[str, list[str]] = {}
        for address, env in sorted(workers.items()):
            theirs = env.get(key, "missing")
            if theirs != mine:
                odd.setdefault(theirs, []).append(address)
        for theirs, where in odd.items():
            more = f" (and {len(where) - 1} more worker{'s' if len(where) > 2 else ''})" if len(where) > 1 else ""
            parts.append(f"{key} {theirs} on {where[0]}{more}, {mine} here")
    return "; ".join(parts) or None


def _call_batch(fn: Callable[..., Any], batch: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Worker side: run one chunk of tasks (module level, so that it pickles)."""
    return [fn(*args) for args in batch]


def check_address(address: str) -> None:
    """ValueError (``not an address like ... (why)``) unless ``address`` is one a
    ``dask.distributed`` client can dial: a known scheme and, for the socket ones, a (non-empty)
    host that can be a host name (no label over 63 characters, no empty one) and a port in
    1..65535; an ``inproc://`` address of this process (a malformed address is an error
    in the address, not a scheduler that did not answer). ValueError (``not usable here: ...``)
    for ``tls://`` without TLS credentials configured, or ``ucx://`` without a UCX backend."""
    from distributed.comm.addressing import get_address_host_port, parse_address

    try:
        scheme, loc = parse_address(address)
        if scheme == "inproc":
            _check_inproc(loc)
        elif scheme != "ucx":  # no host:port to read in ucx
            host, port = get_address_host_port(address)
            if not host:  # tcp://:8786 listens on every interface, but dials nothing
                raise ValueError(f"no host before the port in {address!r}")
            try:  # what the resolver does to it: a label over 63 characters or an empty one fails
                host.encode("idna")
            except UnicodeError as exc:
                raise ValueError(f"host {host!r} is not a host name: {exc.__cause__ or exc}") from None
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not in 1..65535")
    except ValueError as exc:
        raise ValueError(f"not an address like tcp://host:8786 ({' '.join(str(exc).split())})") from None
    _check_usable(scheme)


def _check_inproc(loc: str) -> None:
    """An ``inproc://`` address names a scheduler in this very process (``inproc://IP/PID/N``):
    one of another process, or a malformed one, can never answer (distributed failed on it with
    "not enough values to unpack" after the 5 s wait)."""
    parts = loc.split("/")
    if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) != os.getpid():
        raise ValueError(f"inproc://{loc} is not a scheduler of this process (inproc://IP/{os.getpid()}/N); "
                         "another process's scheduler is reached by tcp://host:port")


def _check_usable(scheme: str) -> None:
    """ValueError (``not usable here: ...``) for a scheme that needs what this installation
    lacks: ``ucx`` without a UCX backend installed, ``tls`` without TLS credentials in Dask's
    configuration. (The client failed on both with a TypeError from inside distributed, which
    the command line reported as a bug in pkvm.)"""
    if scheme == "ucx":
        from distributed.comm.registry import get_backend

        try:
            get_backend(scheme).get_connector()
        except Exception as exc:  # noqa: BLE001 - any failure means the backend is unusable here
            raise ValueError("not usable here: this installation has no working UCX backend "
                             f"({type(exc).__name__}); use tcp://host:port") from None
    elif scheme == "tls":
        from distributed.security import Security

        if Security().get_connection_args("client").get("ssl_context") is None:
            raise ValueError("not usable here: tls:// needs TLS credentials, and Dask's configuration "
                             "has none (distributed.comm.tls.ca-file, .client.cert, .client.key)")


def _detail(exc: BaseException) -> str:
    """``exc`` in one line: its text, or its type when it has none."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: The event topic on which a worker the late-worker check refuses says why (the runner's client
#: subscribes to it; :func:`_environment_check`).
REFUSED_TOPIC = "pkvm-worker-refused"

#: Seconds a refusing worker waits for the scheduler to say whether the runner is still there.
_ASK_TIMEOUT_S = 5.0


def _environment_check(expected: dict[str, str], sentinel: str) -> Any:
    """The worker plugin that checks each worker joining a ``--scheduler`` cluster after the
    runner connected (:meth:`Runner._check_late_workers`; docs/sensitivity.md, on
    ``--scheduler``). Its class is made here, where ``distributed`` is imported (lazily, as
    everywhere in this module), so Dask pickles it by value; on the worker it calls that
    worker's own :func:`environment`."""
    from distributed.core import Status
    from distributed.diagnostics.plugin import WorkerPlugin

    class EnvironmentCheck(WorkerPlugin):
        """``setup`` runs on every worker of the cluster when the runner registers the plugin, and
        on every worker that joins later, before it reads a task from the scheduler
        (``Worker._register_with_scheduler`` sets the plugins up before it starts handling the
        scheduler's messages). A worker whose :func:`~pkvm.experiments.execution.environment`
        differs from ``expected`` pauses at once (status ``closing_gracefully``: the scheduler
        assigns it nothing, and it starts nothing it was sent), reports what differs on
        :data:`REFUSED_TOPIC` and closes, with its nanny (which then does not restart it).

        ``sentinel`` is the key of a task the runner's client holds while it is connected: a
        runner that died without unregistering the plugin leaves it behind, and the scheduler
        forgets the key when the client goes, so that such a plugin then refuses nothing."""

        def __init__(self, expected: dict[str, str], sentinel: str) -> None:
            self.expected = dict(expected)
            self.sentinel = sentinel
            self._closing: Any = None  # the close task, referenced until it is done

        async def setup(self, worker: Any) -> None:
            try:
                mine = environment()
            except Exception as exc:  # noqa: BLE001 - a worker that cannot tell is refused too
                differs: str | None = f"its environment() failed ({_detail(exc)})"
            else:
                differs = _mismatch(self.expected, {worker.address: mine})
            if differs is None or not await self._runner_connected(worker):
                return
            worker.status = Status.closing_gracefully  # paused now; the scheduler is told
            worker.log_event(REFUSED_TOPIC, {"worker": worker.address, "differs": differs})
            self._closing = asyncio.ensure_future(
                worker.close(reason=f"pkvm: this worker does not run the client's pkvm: {differs}", nanny=True))

        async def _runner_connected(self, worker: Any) -> bool:
            """False once the scheduler has forgotten the runner's sentinel task (its client is
            gone); True while it has it, and when the scheduler does not answer in time."""
            try:
                states = await asyncio.wait_for(worker.scheduler.get_task_status(keys=[self.sentinel]),
                                                _ASK_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - cannot tell: refusing a mismatching worker is the safe side
                return True
            return states.get(self.sentinel) is not None

    return EnvironmentCheck(expected, sentinel)


def _probe_scheduler(address: str, timeout: float) -> None:
    """Return once the server at ``address`` has answered Dask's ``identity`` request as a
    scheduler; :class:`SchedulerUnreachableError` when nothing answers within ``timeout``
    seconds (refused, unresolvable, silent) or what answers is not a Dask scheduler (another
    protocol, a worker). The probe runs on its own event loop in a daemon thread, so that it
    works from inside a running event loop too and can never outlive its deadline."""
    from distributed.comm.core import connect
    from distributed.security import Security

    args = Security().get_connection_args("client")

    async def ask() -> Any:
        comm = await connect(address, timeout=timeout, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    outcome: list[Any] = []

    def probe() -> None:
        try:
            outcome.append(("answer", asyncio.run(asyncio.wait_for(ask(), timeout))))
        except BaseException as exc:  # noqa: BLE001 - reported below, in the caller's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=probe, name="pkvm-scheduler-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5.0)  # asyncio.wait_for ends the probe at ``timeout``; 5 s to unwind
    unreachable = f"--scheduler {address}: no Dask scheduler answered within {timeout:g} s"
    if not outcome:
        raise SchedulerUnreachableError(unreachable)
    kind, value = outcome[0]
    if kind == "error":
        # distributed gives up on a refused or unresolvable address with OSError("Timed out
        # trying to connect ..."), after retrying it for the whole timeout
        if isinstance(value, (TimeoutError, asyncio.TimeoutError)) or str(value).startswith("Timed out"):
            raise SchedulerUnreachableError(f"{unreachable} ({_detail(value)})" if str(value) else unreachable)
        if isinstance(value, OSError):
            raise SchedulerUnreachableError(f"--scheduler {address}: could not connect to a Dask scheduler "
                                            f"({_detail(value)})")
        raise SchedulerUnreachableError(
            f"--scheduler {address}: the server there is not a Dask scheduler (its answer is not Dask's "
            f"protocol: {_detail(value)}); a scheduler listens on port 8786 unless told otherwise, "
            "its dashboard (HTTP) on 8787")
    kind_of = value.get("type") if isinstance(value, dict) else None
    if not (isinstance(kind_of, str) and kind_of.endswith("Scheduler")):
        what = f"a Dask {kind_of}" if isinstance(kind_of, str) and kind_of else "something else"
        raise SchedulerUnreachableError(f"--scheduler {address}: the server there is {what}, not a Dask "
                                        "scheduler (give the scheduler's address, e.g. tcp://host:8786)")


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """SIGINT ignored while the local cluster starts, so that the worker processes it spawns
    inherit that: an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler. The workers stop when the cluster is closed.

    SIGINT is also blocked in this thread meanwhile, so that the threads the cluster starts
    (its event loop, and the threads that loop starts to spawn worker processes) inherit the
    blocked signal, and so does every worker process spawned from them later: a worker that
    a nanny restarts (one that died, or exceeded its memory) is spawned when SIGINT is no
    longer ignored here, and died on the user's Ctrl-C with a KeyboardInterrupt traceback. A
    blocked signal stays blocked across fork and exec, and nothing in a worker unblocks it.
    multiprocessing's resource tracker is started first: starting it unblocks SIGINT in the
    thread that does (``resource_tracker.ensure_running``), which was the cluster's event
    loop. (:data:`_IGNORE_SIGINT` makes each worker ignore SIGINT too, should the mask be lost.)

    Ctrl-C on a terminal signals the whole process group: each worker printed a
    KeyboardInterrupt traceback, and one while the cluster started printed distributed's
    ``close_clusters`` traceback at exit. A Ctrl-C during the start (a second or two) is lost
    (the signal cannot be kept pending: threads that numpy's BLAS started take it and drop it);
    the next one stops pkvm. Only the main thread can change signal handlers; from another
    thread, or where a handler not installed from Python would be lost, this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)


#: A worker preload (Python source: distributed runs it in each worker process, in its main
#: thread, before the worker starts; restarted ones included): SIGINT ignored there.
_IGNORE_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)"


def max_jobs() -> int:
    """The most local worker processes a :class:`Runner` starts: 4 per CPU. The runs are
    CPU-bound, so more buy nothing, and each worker is a process of its own (``-j 99999``
    would try to start 99999 of them)."""
    return 4 * (os.cpu_count() or 1)


def _call_within(timeout: float, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` in a daemon thread, waited for at most ``timeout`` seconds; whatever it
    raises is dropped (for best-effort clean-up calls that have no timeout of their own)."""
    def run() -> None:
        with contextlib.suppress(Exception):
            fn(*args)

    t = threading.Thread(target=run, name="pkvm-cleanup", daemon=True)
    t.start()
    t.join(timeout)


class Runner:
    """Where a batch of runs executes: in this process, on a local cluster, or on a remote one.

    Use it as a context manager; one runner can serve several batches (the CLI keeps one
    cluster for every memory size of a sweep).

    Args:
        jobs: worker processes of the local cluster, at most :func:`max_jobs`; 1 (and no
            ``scheduler``) runs serially in this process.
        scheduler: the address of an existing ``dask.distributed`` scheduler
            (``tcp://host:8786``); ``jobs`` is then ignored.
        connect_timeout: seconds to wait for ``scheduler``.
        worker_timeout: seconds to wait, once ``scheduler`` answered, for a worker to join it;
            and, while runs are out on any cluster, how long it may have no worker at all
            before :meth:`map` gives up.
        notice: called with one line for each worker that joined ``scheduler``'s cluster after
            the runner connected, runs another pkvm, Python or Dask, and was closed before it
            ran anything (a worker plugin checks each one; the runs go on on the others).
            Called from the thread that calls :meth:`map` or :meth:`close`; by default
            ``warnings.warn(line, RuntimeWarning)``.

    Raises:
        ValueError: ``jobs`` is not a positive int or (without ``scheduler``) more than
            :func:`max_jobs`, ``connect_timeout`` is not a positive number, or ``scheduler`` is
            empty or not an address (an unknown scheme, a host that cannot be a host name,
            no port, a port outside 1..65535) or one this installation cannot dial (``tls://``
            without TLS credentials configured, ``ucx://`` without a UCX backend, ``inproc://``
            of another process); or ``worker_timeout`` is not a positive number.
        SchedulerUnreachableError: (on entry) no scheduler answered in time, or what answered
            is not a Dask scheduler.
        NoWorkersError: (on entry) the scheduler has no worker, and none joined within
            ``worker_timeout`` seconds.
        WorkerMismatchError: (on entry) a worker of ``scheduler`` runs another pkvm, Python or
            Dask than this process.
        RunError: (on entry) the local cluster could not start (worker processes that fail to
            start: too few file descriptors, or a script that starts the runs without
            ``if __name__ == "__main__":``, which each worker process imports again).
    """

    def __init__(self, jobs: int = 1, scheduler: str | None = None, *,
                 connect_timeout: float = CONNECT_TIMEOUT_S, worker_timeout: float = WORKER_TIMEOUT_S,
                 notice: Callable[[str], None] | None = None) -> None:
        if type(jobs) is not int or jobs < 1:
            raise ValueError(f"jobs {jobs!r} must be a positive int")
        if scheduler is None and jobs > max_jobs():
            raise ValueError(f"jobs {jobs} is more than {max_jobs()} worker processes (4 per CPU of this "
                             "machine): each is a Python process with its own pkvm")
        for name, timeout in (("connect_timeout", connect_timeout), ("worker_timeout", worker_timeout)):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
                raise ValueError(f"{name} {timeout!r} must be a positive number of seconds")
        if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
            raise ValueError(f"scheduler {scheduler!r} must be an address like tcp://host:8786")
        if notice is not None and not callable(notice):
            raise ValueError(f"notice {notice!r} must be a callable taking one str")
        if scheduler is not None:
            try:
                check_address(scheduler.strip())
            except ValueError as exc:
                raise ValueError(f"scheduler {scheduler!r} is {exc}") from None
        self.jobs = jobs
        self.scheduler = scheduler.strip() if scheduler is not None else None
        self.connect_timeout = connect_timeout
        self.worker_timeout = worker_timeout
        self._client: Any = None
        self._cluster: Any = None
        self.notice = notice
        # the late-worker check (_check_late_workers): the plugin's name, the client's sentinel
        # future, and the refusals reported meanwhile (appended by the client's event loop)
        self._plugin: str | None = None
        self._sentinel: Any = None
        self._refused: collections.deque[str] = collections.deque()
        # Ctrl-C seen while this runner is entered (``__enter__``): see _watch_sigint
        self._sigint = False
        self._sigint_prev: Any = None
        self._unraisable_prev: Any = None
        self._excepthook_prev: Any = None

    @property
    def distributed(self) -> bool:
        """True if tasks go to a ``dask.distributed`` cluster (not run in this process)."""
        return self.scheduler is not None or self.jobs > 1

    def describe(self) -> str:
        """Where the tasks run, in a few words (for headers and docs)."""
        if self.scheduler is not None:
            return f"Dask cluster at {self.scheduler}"
        if self.jobs > 1:
            return f"local Dask cluster of {self.jobs} worker processes"
        return "serially in-process"

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> Runner:
        self._watch_sigint()
        try:
            self.start()
        except BaseException:
            self._unwatch_sigint()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        finally:
            self._unwatch_sigint()

    def _watch_sigint(self) -> None:
        """While entered, a Ctrl-C is also noted, and :meth:`map` raises KeyboardInterrupt
        between tasks once it was: Python raises it wherever the main thread is, and where that
        is a callback from C code (a Cython function that cannot pass exceptions on, a gc
        callback) it is printed as "Exception ignored" and lost, so the run went on
        (``tests/test_execution.py::test_a_ctrl_c_lost_in_c_code_still_stops_the_runs``). The
        previous handler still runs, and Python's "Exception ignored" report of the lost
        KeyboardInterrupt is not printed (``sys.unraisablehook``, and ``sys.excepthook``, through
        which Cython prints its traceback first). Only from the main thread,
        and not over a handler not installed from Python or an ignored SIGINT."""
        if threading.current_thread() is not threading.main_thread():
            return
        prev = signal.getsignal(signal.SIGINT)
        if prev is None or prev == signal.SIG_IGN:  # C's handler; or Ctrl-C is to do nothing
            return
        self._sigint = False
        self._sigint_prev = prev
        hook = self._unraisable_prev = sys.unraisablehook

        def quiet(unraisable: Any) -> None:  # the lost KeyboardInterrupt: map raises it again
            if not (self._sigint and unraisable.exc_type is KeyboardInterrupt):
                hook(unraisable)

        sys.unraisablehook = quiet
        # Cython prints the traceback of an exception it cannot pass on through sys.excepthook
        # (PyErr_PrintEx) before it reports it as unraisable
        excepthook = self._excepthook_prev = sys.excepthook

        def quiet_excepthook(exc_type: Any, value: Any, tb: Any) -> None:
            if not (self._sigint and exc_type is KeyboardInterrupt):
                excepthook(exc_type, value, tb)

        sys.excepthook = quiet_excepthook

        def note(signum: int, frame: Any) -> None:
            self._sigint = True
            if callable(prev):
                prev(signum, frame)
            elif prev == signal.SIG_DFL:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, note)

    def _unwatch_sigint(self) -> None:
        prev, self._sigint_prev = self._sigint_prev, None
        if prev is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, prev)
            sys.unraisablehook = self._unraisable_prev
            sys.excepthook = self._excepthook_prev

    def _check_sigint(self) -> None:
        if self._sigint:
            raise KeyboardInterrupt

    def start(self) -> None:
        """Connect to the scheduler or start the local cluster (no-op when serial or started)."""
        if not self.distributed or self._client is not None:
            return
        from distributed import Client, LocalCluster

        if self.scheduler is not None:
            # Ask first, within the timeout, whether a Dask scheduler is there: Client() waits
            # for ever on a server that accepts and never answers (distributed's handshake
            # read has no timeout), fails with MemoryError or struct.error on one that speaks
            # another protocol (an HTTP server, the dashboard's port), and leaves a half-built
            # client whose __del__ prints a traceback 10 s later.
            _probe_scheduler(self.scheduler, self.connect_timeout)
            try:
                self._client = Client(self.scheduler, timeout=self.connect_timeout,
                                      set_as_default=False)
            except Exception as exc:  # noqa: BLE001 - whatever the client met, the cluster failed
                raise SchedulerUnreachableError(
                    f"--scheduler {self.scheduler}: could not connect to the Dask scheduler "
                    f"({_detail(exc)})") from None
            try:
                self._wait_for_workers()
                env = self._check_workers()
                self._check_late_workers(env)
            except BaseException:  # Ctrl-C too: a failed start leaves no client behind
                self.close()
                raise
            return
        try:
            with warnings.catch_warnings(), _workers_ignore_sigint():
                # start-up notices (slow scratch disk ...) are not results
                warnings.simplefilter("ignore", UserWarning)
                self._cluster = LocalCluster(n_workers=self.jobs, threads_per_worker=1, processes=True,
                                             dashboard_address=None, silence_logs=logging.CRITICAL,
                                             preload=[_IGNORE_SIGINT])
                self._client = Client(self._cluster, set_as_default=False)
        except BaseException as exc:  # a failed start leaves no cluster behind
            self.close()
            if not isinstance(exc, Exception):  # Ctrl-C, SystemExit
                raise
            raise RunError(f"could not start a local Dask cluster of {self.jobs} worker processes "
                           f"({_detail(exc)})") from exc
        # The scheduler runs in this process and hooks a GC diagnosis into gc.callbacks (it
        # only logs, and its logs are silenced). A KeyboardInterrupt raised while a gc
        # callback runs is printed as "Exception ignored" and lost: Ctrl-C did nothing.
        from distributed.gc import disable_gc_diagnosis

        disable_gc_diagnosis(force=True)

    def _wait_for_workers(self) -> None:
        """Return once the remote cluster has a running worker; :class:`NoWorkersError` when
        none joins within ``worker_timeout`` seconds. A scheduler without workers (a bare
        ``dask scheduler``) accepts tasks and never runs them: pkvm waited for ever. A task is
        pending while this waits, so that an adaptive cluster scaled to zero starts a worker
        (it scales on the tasks it is given, and this is before pkvm's)."""
        client = self._client
        pending = client.submit(os.getpid, pure=False)
        try:
            client.wait_for_workers(1, timeout=self.worker_timeout)
        except TimeoutError:
            raise NoWorkersError(
                f"--scheduler {self.scheduler}: the Dask scheduler there has no workers (none joined "
                f"within {self.worker_timeout:g} s); start some with: dask worker {self.scheduler} "
                "--nthreads 1") from None
        except Exception as exc:  # noqa: BLE001 - the scheduler went away while we waited
            raise SchedulerUnreachableError(
                f"--scheduler {self.scheduler}: lost the Dask scheduler while waiting for a worker "
                f"({_detail(exc)})") from None
        finally:
            client.cancel([pending])

    def _check_workers(self) -> dict[str, str]:
        """:class:`WorkerMismatchError` unless every worker of the remote cluster has this
        process's :func:`environment` (returned): a worker with another pkvm computed other
        numbers (or failed on what this one sends it) without a word."""
        try:
            # by reference: each worker runs its own pkvm's environment()
            workers = self._client.run(environment)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot import pkvm, or an old one
            raise WorkerMismatchError(
                f"--scheduler {self.scheduler}: could not ask the workers which pkvm they run "
                f"({_detail(exc)}); every worker needs this pkvm installed") from None
        here = environment()
        differs = _mismatch(here, workers)
        if differs is not None:
            raise WorkerMismatchError(
                f"--scheduler {self.scheduler}: the workers do not run this pkvm, Python and Dask: "
                f"{differs}; install the same on every worker")
        return here

    def _check_late_workers(self, env: dict[str, str]) -> None:
        """Register the worker plugin that checks every worker joining later against ``env``
        and closes a mismatching one before it reads a task
        (:func:`_environment_check`); its refusals come back on
        an event topic. The plugin has a name of its own (another pkvm client of the cluster
        keeps its own) and is unregistered by :meth:`close`; the sentinel, a tiny task held
        while this client is connected, makes one left behind by a client that died inert."""
        client = self._client
        token = uuid.uuid4().hex[:12]
        self._sentinel = client.submit(int, 0, key=f"pkvm-runner-{token}", pure=False)
        client.subscribe_topic(REFUSED_TOPIC, self._on_refused)
        try:
            client.register_plugin(_environment_check(env, self._sentinel.key), name=f"pkvm-environment-{token}")
        except Exception as exc:  # noqa: BLE001 - the scheduler went away, or refuses plugins
            raise SchedulerUnreachableError(
                f"--scheduler {self.scheduler}: could not register pkvm's check of the workers that join "
                f"later ({_detail(exc)})") from None
        self._plugin = f"pkvm-environment-{token}"

    def _on_refused(self, event: tuple[float, Any]) -> None:
        """The client's event loop: a worker refused by the plugin (flushed by
        :meth:`_flush_notices`, in the caller's thread)."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict):
            self._refused.append(
                f"--scheduler {self.scheduler}: closed the worker {msg.get('worker')} that joined after pkvm "
                f"connected: it does not run this pkvm, Python and Dask ({msg.get('differs')}); it ran "
                "none of the runs")

    def _flush_notices(self) -> None:
        while self._refused:
            line = self._refused.popleft()
            if self.notice is not None:
                self.notice(line)
            else:
                warnings.warn(line, RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Disconnect; shut the local cluster down (an external cluster keeps running)."""
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        plugin, self._plugin, self._sentinel = self._plugin, None, None
        if client is not None:
            if plugin is not None and client.status == "running":
                # within the connect timeout: a scheduler that went away does not hold close up
                # (distributed's public call has no timeout: it waits in a thread of its own,
                # which client.close() below ends if it is still waiting)
                _call_within(self.connect_timeout, client.unregister_worker_plugin, plugin)
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(REFUSED_TOPIC)
            client.close()
            with contextlib.suppress(Exception):  # refusals reported after the last map
                self._flush_notices()
        if cluster is not None:
            cluster.close()

    # -- running ----------------------------------------------------------------------------

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], labels: Sequence[str],
            progress: Callable[[str, float], None] | None = None, *, pass_progress: bool = False,
            chunksize: int = 1, names: Sequence[str] | None = None) -> list[Any]:
        """``[fn(*args) for args in tasks]``, in order, wherever this runner runs them.

        ``labels[i]`` names task ``i`` in progress reports, and ``names[i]`` (default: the label)
        in errors: say which configuration it is. ``progress(label, fraction)``: serially, ``fn`` is called with
        ``progress=`` a per-task callback when ``pass_progress``; every task reports 1.0 when it
        is done. ``chunksize`` tasks travel to a worker together (for many short tasks).

        Raises:
            RunError: a task failed (retried once on a cluster); names its label.
            NoWorkersError: on a cluster, no worker was there for ``worker_timeout``
                seconds while runs were out (they left, died, or were refused).
        """
        if len(labels) != len(tasks) or (names is not None and len(names) != len(tasks)):
            raise ValueError(f"{len(tasks)} tasks but {len(labels)} labels"
                             + ("" if names is None else f" and {len(names)} names"))
        if type(chunksize) is not int or chunksize < 1:
            raise ValueError(f"chunksize {chunksize!r} must be a positive int")
        self._check_sigint()  # a Ctrl-C lost before the runs (_watch_sigint)
        if not self.distributed:
            return self._map_serial(fn, tasks, labels, progress, pass_progress)
        self.start()
        return self._map_dask(fn, tasks, labels, progress, chunksize, list(names or labels))

    def _map_serial(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], labels: Sequence[str],
                    progress: Callable[[str, float], None] | None, pass_progress: bool) -> list[Any]:
        out = []
        for args, label in zip(tasks, labels):
            self._check_sigint()
            if pass_progress and progress is not None:
                out.append(fn(*args, progress=lambda f, _l=label: progress(_l, f)))
            else:
                out.append(fn(*args))
            if progress is not None:
                progress(label, 1.0)
        return out

    def _map_dask(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], labels: Sequence[str],
                  progress: Callable[[str, float], None] | None, chunksize: int,
                  names: Sequence[str]) -> list[Any]:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        client = self._client
        nchunks = math.ceil(len(tasks) / chunksize)
        chunks = [(i * chunksize, min(len(tasks), (i + 1) * chunksize)) for i in range(nchunks)]
        futures = {}
        for lo, hi in chunks:
            fut = client.submit(_call_batch, fn, list(tasks[lo:hi]), retries=1, pure=False)
            futures[fut] = (lo, hi)
        results: list[Any] = [None] * len(tasks)
        done = 0
        try:
            for fut in self._as_completed(as_completed(list(futures), loop=client.loop),
                                          lambda: len(tasks) - done):
                self._check_sigint()
                self._flush_notices()
                lo, hi = futures[fut]
                if fut.status not in ("finished", "error"):  # the scheduler went away, or a cancel
                    raise RunError(f"{names[lo]} did not finish: the Dask cluster reports it {fut.status} (the "
                                   "connection to the scheduler was lost, or the task was cancelled)")
                if fut.status != "finished":
                    exc = fut.exception()
                    label = names[lo]
                    if hi - lo > 1:
                        # Re-run here to name the task, unless the worker died: the task may
                        # kill this process the same way (a crash, the OOM killer).
                        bad = None if isinstance(exc, KilledWorker) else _first_failing(fn, tasks[lo:hi])
                        label = (names[lo + bad] if bad is not None else
                                 f"{names[lo]} (or one of the {hi - lo - 1} runs sent with it)")
                    raise RunError(f"{label} failed on the cluster (tried twice): "
                                   f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
                results[lo:hi] = fut.result()
                done += hi - lo
                if progress is not None:
                    for label in labels[lo:hi]:
                        progress(label, 1.0)
        finally:
            client.cancel(list(futures))
            self._flush_notices()
        return results

    def _as_completed(self, ac: Any, left: Callable[[], int]) -> Iterator[Any]:
        """The futures of ``ac`` (a ``distributed.as_completed``) as they complete, while
        watching that the cluster still has a worker: when it has had none for
        ``worker_timeout`` seconds (every worker left, died for good, or was refused by the
        late-worker check), :class:`NoWorkersError` instead of waiting for ever. ``left()``:
        how many runs are still to come, for the message. Ctrl-C is seen between polls."""
        client = self._client
        none_since: float | None = None
        next_check = 0.0
        while True:
            batch = ac.next_batch(block=False)
            if batch:
                none_since = None
                yield from batch
                continue
            if not ac.count():
                return
            self._check_sigint()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _WORKER_POLL_S
                try:
                    workers = len(client.nthreads())
                except Exception:  # noqa: BLE001 - the scheduler went away: the futures say so
                    workers = 1
                if workers:
                    none_since = None
                elif none_since is None:
                    none_since = now
                elif now - none_since >= self.worker_timeout:
                    self._flush_notices()
                    where = f"--scheduler {self.scheduler}" if self.scheduler is not None else \
                        f"the local Dask cluster of {self.jobs} worker processes"
                    hint = (f"; start some with: dask worker {self.scheduler} --nthreads 1"
                            if self.scheduler is not None else "")
                    raise NoWorkersError(
                        f"{where}: no worker left to run the {left()} runs still to run (none for "
                        f"{self.worker_timeout:g} s: every worker left, died or was refused){hint}")
            time.sleep(_POLL_S)


def _first_failing(fn: Callable[..., Any], batch: Sequence[tuple[Any, ...]]) -> int | None:
    """Which task of a failed chunk fails (re-run locally, in order, to name it); None when
    none does here. Not for a chunk whose worker died (KilledWorker)."""
    for i, args in enumerate(batch):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - looking for the one that raised on the worker
            return i
    return None
