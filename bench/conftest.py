"""Fixtures for the RangeMap benchmarks: seeded workload data, built once per session.

Run the benchmarks with ``pytest bench/ --benchmark-only``.  ``--rangemap-scale 0.01`` shrinks
every operation count (the key space stays ``2**28``), which together with
``--benchmark-disable`` turns the suite into a quick smoke test of the workloads and checks.
"""

import pytest
from rangemap_workloads import WorkloadData


def pytest_addoption(parser):
    parser.addoption(
        "--rangemap-scale",
        type=float,
        default=1.0,
        help="multiply every RangeMap workload's operation count by this factor (default 1)",
    )


@pytest.fixture(scope="session")
def workload_data(request):
    """Operation sequences and expected results for W1-W4, from a fixed seed."""
    return WorkloadData(scale=request.config.getoption("--rangemap-scale"))
