"""``--scheduler ADDRESS`` when what is at the address is not a working Dask scheduler.

A malformed address is a usage error (exit 2, at once); a well-formed one where no scheduler
answers within the timeout, or where the server is not a Dask scheduler, is a failed run (exit
1). Either way the user sees one line and no traceback, and pkvm never waits longer than the
timeout: ``dask.distributed.Client`` alone waited for ever on a server that accepts and never
answers, and reported a server of another protocol (an HTTP server) as "internal error:
MemoryError" followed, 10 s later, by a traceback from the half-built client's ``__del__``.
(A real scheduler and a worker's address: ``tests/test_execution.py``.)
"""

import contextlib
import socket
import threading
import time

import pytest

from pkvm.cli import main
from pkvm.experiments.execution import Runner, SchedulerUnreachableError

ARGV = ["compare", "--memory", "16M", "-q"]


@contextlib.contextmanager
def _server(behaviour):
    """A TCP server on 127.0.0.1 that meets each connection with ``behaviour(conn)``; yields
    its ``tcp://`` address."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()
    conns = []

    def serve():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conns.append(conn)
            threading.Thread(target=behaviour, args=(conn, stop), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


def _http(conn, stop):
    """An HTTP server (the dashboard's port, 8787, given for the scheduler's)."""
    with contextlib.suppress(OSError):
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n" * 4)
    stop.wait(30)


def _silent(conn, stop):
    """Accepts the connection and never says a word."""
    stop.wait(30)


def _hangs_up(conn, stop):
    conn.close()


def _main_in_thread(argv, limit):
    """``main(argv)`` in a daemon thread: (exit status, seconds) or (None, limit) when it has
    not returned within ``limit`` seconds (the old code never returned on a silent server)."""
    out = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: out.append(main(argv)), daemon=True)
    t.start()
    t.join(limit)
    return (out[0] if out else None), time.monotonic() - t0


def _one_line(err):
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("pkvm: error: --scheduler "), err
    assert "internal error" not in err, err


@pytest.fixture
def short_timeout(monkeypatch):
    """The CLI's connect timeout (5 s) at 1 s, so that these tests are quick."""
    monkeypatch.setitem(Runner.__init__.__kwdefaults__, "connect_timeout", 1.0)


def _failed_run_against(server, capsys):  # type: ignore[no-untyped-def]
    """Run the CLI against a scheduler address served by ``server``: the run must fail (exit 1)
    with one line on stderr; returns ``(address, seconds taken, stderr)``."""
    with _server(server) as address:
        code, took = _main_in_thread([*ARGV, "--scheduler", address], 20)
    err = capsys.readouterr().err
    assert code == 1, (took, err)
    _one_line(err)
    return address, took, err


def test_a_server_of_another_protocol_is_a_failed_run_in_one_line(capsys, monkeypatch, short_timeout):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    address, took, err = _failed_run_against(_http, capsys)
    assert f"--scheduler {address}: the server there is not a Dask scheduler" in err
    assert "8786" in err and took < 10


def test_a_server_that_never_answers_is_given_up_on_at_the_timeout(capsys, monkeypatch, short_timeout):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    address, took, err = _failed_run_against(_silent, capsys)
    assert err == f"pkvm: error: --scheduler {address}: no Dask scheduler answered within 1 s\n"
    assert took < 10


def test_a_server_that_hangs_up_is_a_failed_run_in_one_line(capsys, monkeypatch, short_timeout):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    address, took, err = _failed_run_against(_hangs_up, capsys)
    assert "no Dask scheduler answered" in err or "could not connect to a Dask scheduler" in err


def test_a_refused_connection_is_a_failed_run_at_the_timeout(capsys, monkeypatch, short_timeout):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        code, took = _main_in_thread([*ARGV, "--scheduler", address], 20)
    err = capsys.readouterr().err
    assert code == 1, err
    _one_line(err)
    assert err.startswith(f"pkvm: error: --scheduler {address}: no Dask scheduler answered within 1 s")


@pytest.mark.parametrize("address", ["tcp://:8786", ":8786", "ws://:1"])
def test_an_address_without_a_host_is_a_usage_error(capsys, address):
    """It waited the 5 s and said no scheduler answered; it can never dial anything."""
    t0 = time.monotonic()
    assert main([*ARGV, "--scheduler", address]) == 2
    err = capsys.readouterr().err
    assert err == (f"pkvm: error: --scheduler {address}: not an address like tcp://host:8786 (no host before "
                   f"the port in {address!r})\n")
    assert time.monotonic() - t0 < 4
    with pytest.raises(ValueError, match="no host before the port"):
        Runner(scheduler=address)


def test_the_runner_names_what_answered(short_timeout):
    """The API raises the one documented error, SchedulerUnreachableError (an OSError)."""
    with _server(_http) as address, pytest.raises(SchedulerUnreachableError, match="not a Dask scheduler"):
        Runner(scheduler=address).start()


def test_a_real_http_server_is_a_scheduler_that_never_answered(capsys, monkeypatch, short_timeout):
    """docs/sensitivity.md said the dashboard's port (an HTTP server) is reported as "not a Dask
    scheduler". A real HTTP server (the dashboard, Python's http.server) waits for a request,
    and what it sends back to Dask's handshake, if anything, is no Dask message: pkvm reports it
    as no scheduler answering in time, as the docs now say. (``_http`` above is a server whose
    replies read as a Dask frame header of absurd size.)"""
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # its log is not pkvm's stderr
            pass

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        address = f"tcp://127.0.0.1:{srv.server_address[1]}"
        code, took = _main_in_thread([*ARGV, "--scheduler", address], 20)
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert code == 1 and took < 10, (took, err)
    assert err == f"pkvm: error: --scheduler {address}: no Dask scheduler answered within 1 s\n"


@pytest.mark.parametrize("host", ["a" * 64, "a..b", ".host"])
def test_a_host_name_no_resolver_takes_is_a_usage_error(capsys, host):
    """A host name that cannot be a DNS name (a label longer than 63 characters, an empty
    label) failed as "the server there is not a Dask scheduler (its answer is not Dask's
    protocol: UnicodeError ...)", exit 1: no server was ever reached. It is a malformed
    address: exit 2, at once."""
    address = f"tcp://{host}:8786"
    t0 = time.monotonic()
    assert main([*ARGV, "--scheduler", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pkvm: error: --scheduler {address}: not an address like tcp://host:8786 (host "), err
    assert err.count("\n") == 1 and time.monotonic() - t0 < 4
    with pytest.raises(ValueError, match="is not a host name"):
        Runner(scheduler=address)
