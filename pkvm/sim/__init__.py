"""The simulation layer: the timeline engine and the locks it models, between the actors it
schedules and the experiments that run it.

See the "Layers" section of ``docs/design.md``.
"""
