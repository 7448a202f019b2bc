"""Which metrics a model change moves: ``E.run(...).metrics(wall=False)`` of two source trees,
key by key, over every workload (``replay`` aside) x platform x policy at 1 GiB with 1 and 3
vCPUs.

    python3 bench/metrics_diff.py /work/main /work/wt-NAME [--policies all] [--show 3]

Each tree runs in its own interpreter (``PYTHONPATH=TREE``; build its core in place first).
Prints, per metric key that differs, how many runs it moved in and a few ``old -> new``
examples; exits 0. ``--policies default`` (the default) runs each platform's default policy,
``all`` every policy ``pkvm compare`` runs on it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

_DUMP = r"""
import json, sys
from pkvm import experiments as E
from pkvm.experiments.workloads import WORKLOADS
every = sys.argv[2] == "all"
out = {}
for platform in E.PLATFORMS:
    for policy in (E.PLATFORM_POLICIES[platform] if every else (None,)):
        for w in WORKLOADS:
            if w == "replay":
                continue
            for v in (1, 3):
                r = E.run(E.Config(platform=platform, memory="1G", workload=w, vcpus=v, policy=policy), seed=0)
                out[f"{platform}/{policy or 'default'}/{w}/{v}cpu"] = r.metrics(wall=False)
json.dump(out, open(sys.argv[1], "w"))
"""


def _dump(tree: str, policies: str, path: str) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=tree)
    subprocess.run([sys.executable, "-c", _DUMP, path, policies], env=env, check=True, cwd=tree)
    with open(path) as f:
        return json.load(f)  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--policies", choices=("default", "all"), default="default")
    ap.add_argument("--show", type=int, default=3, help="examples printed per key")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        old = _dump(a.old, a.policies, os.path.join(d, "old.json"))
        new = _dump(a.new, a.policies, os.path.join(d, "new.json"))
    moved: dict[str, list[tuple[str, object, object]]] = collections.defaultdict(list)
    for run in sorted(set(old) | set(new)):
        mo, mn = old.get(run, {}), new.get(run, {})
        for k in sorted(set(mo) | set(mn)):
            if mo.get(k) != mn.get(k):
                moved[k].append((run, mo.get(k), mn.get(k)))
    print(f"{len(old)} runs; {len(moved)} keys moved")
    for k, runs in sorted(moved.items()):
        print(f"{k}: {len(runs)} runs")
        for run, x, y in runs[:a.show]:
            print(f"    {run}: {x} -> {y}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
