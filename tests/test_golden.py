"""Golden runs: exact counters, modeled time and actor split per policy for small
deterministic configurations (tests/golden/*.json, regenerated only by tests/golden/regen.py
after a deliberate model change)."""

from __future__ import annotations

import json
import pathlib

import pytest

from pkvm import experiments as E

GOLDEN = pathlib.Path(__file__).parent / "golden"
FILES = sorted(GOLDEN.glob("*.json"))


def test_every_case_has_a_file():
    import importlib.util

    spec = importlib.util.spec_from_file_location("regen", GOLDEN / "regen.py")
    assert spec and spec.loader
    regen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regen)
    assert sorted(f.stem for f in FILES) == sorted(regen.CASES)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_golden(path):
    want = json.loads(path.read_text())
    cfg = E.Config(**want["config"])
    got = {r.policy: r for r in E.compare(cfg, seed=want["seed"])}
    assert sorted(got) == sorted(want["policies"])
    for policy, w in want["policies"].items():
        r = got[policy]
        diff = {k: (w["counters"].get(k), r.counters.get(k)) for k in set(w["counters"]) | set(r.counters)
                if w["counters"].get(k) != r.counters.get(k)}
        assert not diff, f"{path.stem} {policy}: counters (golden, now) {diff}"
        assert r.modeled_ns == w["modeled_ns"], policy
        assert r.by_actor == w["by_actor"], policy
        assert {p.name: p.modeled_ns for p in r.phases} == w["phases"], policy
        assert r.critical_path_ns == w["critical_path_ns"], policy
        assert r.races == w["races"], policy
        assert {p.name: p.elapsed_ns for p in r.phases} == w["elapsed"], policy
        if r.config.vcpus == 1:  # one vCPU: the timeline is the sum of work
            assert r.critical_path_ns == r.modeled_ns, policy
