"""The simulation layer: the timeline engine and the locks it models, between the actors it
schedules and the experiments that run it. See the "Layers" section of ``docs/design.md``.

Its model-independent pieces, on SimPy (``docs/sim.md``):

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
