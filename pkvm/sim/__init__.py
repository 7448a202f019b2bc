"""The simulation layer: the concurrent timeline and the locks it models, between the actors it
schedules and the experiments that run it. See the "Layers" section of ``docs/design.md``.

- :mod:`pkvm.sim.timeline`: :class:`Timeline`, a VM's vCPU threads and the VMM's main loop
  running concurrently on one SimPy clock with the kernel's locks (``docs/timeline.md``);

its model-independent pieces, on SimPy (``docs/sim.md``):

- :mod:`pkvm.sim.locks`: the kernel's locks (``struct mutex``, ``rwlock_t`` as a queued
  rwlock, ``spinlock_t`` as a queued spinlock) as SimPy primitives, each with hold and wait
  statistics;
- :mod:`pkvm.sim.stats`: :class:`~pkvm.sim.stats.Distribution`, weighted samples with exact
  nearest-rank percentiles;
- :mod:`pkvm.sim.recorder`: :class:`~pkvm.sim.recorder.Recorder`, an opt-in log of slices and
  instants per track;
- :mod:`pkvm.sim.chrome`: the recorder as Chrome trace-event JSON (Perfetto, chrome://tracing);
- :mod:`pkvm.sim.gantt`: the recorder as a per-track Gantt chart (PNG, matplotlib).
"""

from pkvm.sim.timeline import LATENCY_KINDS, LOCKS, RACE_KINDS, READ, WRITE, Timeline, TimelineResult

__all__ = ["LATENCY_KINDS", "LOCKS", "RACE_KINDS", "READ", "WRITE", "Timeline", "TimelineResult"]
