"""The worker plugin that checks a worker joining a ``--scheduler`` cluster after pkvm connected
(:class:`pkvm.experiments.execution.Runner`; docs/sensitivity.md, on ``--scheduler``).

Imported only once a runner connects to a cluster: it needs ``distributed``, and a worker
imports it (by reference, from its own pkvm) when the scheduler hands it the plugin.
"""

from __future__ import annotations

import asyncio
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

#: The event topic on which a refused worker says why (the runner's client subscribes to it).
REFUSED_TOPIC = "pkvm-worker-refused"

#: Seconds a refusing worker waits for the scheduler to say whether the runner is still there.
_ASK_TIMEOUT_S = 5.0


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
        from pkvm.experiments import execution

        try:
            mine = execution.environment()
        except Exception as exc:  # noqa: BLE001 - a worker that cannot tell is refused too
            differs: str | None = f"its environment() failed ({execution._detail(exc)})"
        else:
            differs = execution._mismatch(self.expected, {worker.address: mine})
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
