"""Regenerate the golden files: ``python3 tests/golden/regen.py``.

Only after a deliberate model change; review the diff (``git diff tests/golden``) and say in
the commit message why each changed counter changed.
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from pkvm import experiments as E  # noqa: E402

#: name -> (Config keyword arguments, seed). Small and deterministic; every policy of the platform.
CASES = {
    "snp-boot": ({"platform": "snp", "memory": "64M", "workload": "boot"}, 0),
    "snp-boot-prealloc": ({"platform": "snp", "memory": "64M", "workload": "boot",
                           "options": {"prealloc": "true"}}, 0),
    "snp-mixed": ({"platform": "snp", "memory": "64M", "workload": "mixed", "options": {"ops": "100"},
                   "vcpus": 2}, 1),
    "snp-balloon-4k": ({"platform": "snp", "memory": "32M", "workload": "balloon",
                        "options": {"chunk": "4K", "fraction": "0.05", "cycles": "1"}}, 2),
    "tdx-mixed": ({"platform": "tdx", "memory": "64M", "workload": "mixed", "options": {"ops": "100"}}, 1),
    "tdx-virtio": ({"platform": "tdx", "memory": "64M", "workload": "virtio", "options": {"cycles": "2"}}, 3),
    "sw_protected-mixed": ({"platform": "sw_protected", "memory": "64M", "workload": "mixed",
                            "options": {"ops": "100"}}, 1),
}


def snapshot(kwargs: dict, seed: int) -> dict:
    cfg = E.Config(**kwargs)
    out = {}
    for r in E.compare(cfg, seed=seed):
        out[r.policy] = {"counters": r.counters, "modeled_ns": r.modeled_ns, "by_actor": r.by_actor,
                         "phases": {p.name: p.modeled_ns for p in r.phases},
                         "critical_path_ns": r.critical_path_ns, "races": r.races,
                         "elapsed": {p.name: p.elapsed_ns for p in r.phases}}
    return out


def main() -> None:
    for name, (kwargs, seed) in CASES.items():
        path = HERE / f"{name}.json"
        path.write_text(json.dumps({"config": kwargs, "seed": seed, "policies": snapshot(kwargs, seed)},
                                   indent=1, sort_keys=True) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
