"""pkvm.experiments and pkvm.experiments.workloads: determinism, purity, actor attribution, counters that
follow from the workload's definition, and the error contract of Config."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import experiments as E
from pkvm.actors.vmm import q35_ram_layout
from pkvm.errors import KvmError
from pkvm.experiments import workloads as W

MiB = 1 << 20
SMALL = "64M"
PAGES = 64 * MiB >> 12
IMAGE_PAGES = 2 * MiB >> 12


def run(**kw):
    seed = kw.pop("seed", 1)
    return E.run(E.Config(**{"memory": SMALL, **kw}), seed)


# -- definitions of the workloads, checked through their counters ---------------------------


@pytest.mark.parametrize("policy", E.PLATFORM_POLICIES["snp"])
def test_snp_boot_assigns_every_page_once(policy):
    r = run(policy=policy)
    c = r.counters
    # The image is assigned by LAUNCH_UPDATE, the rest by one RMPUPDATE each when accepted.
    assert c["launch_update_pages"] == IMAGE_PAGES
    assert c["rmpupdate"] == PAGES
    assert c["gmem_pages_allocated"] == PAGES
    # QEMU marks all of RAM private once; the guest's PSCs re-request private (short-circuit).
    assert c["attr_stores"] == PAGES
    assert c["conversions"] >= 1
    assert c["pvalidate"] == PAGES - IMAGE_PAGES  # 2M PVALIDATEs fail on 4K entries, 4K succeed
    assert c["memory_fault_exits"] == 0
    assert [p.name for p in r.phases] == ["launch", "accept"]


def test_tdx_boot_augments_every_accepted_page():
    r = run(platform="tdx", policy="6.19")
    c = r.counters
    assert c["seamcall_aug"] == PAGES - IMAGE_PAGES
    assert c["seamcall_add"] == IMAGE_PAGES
    assert c["tdx_accepts_4k"] == PAGES - IMAGE_PAGES


def test_boot_4k_acceptance_takes_no_2m_pvalidate():
    r2 = run()
    r4 = run(options={"accept": "4K"})
    assert r2.counters["pvalidate"] == r4.counters["pvalidate"]
    assert r2.counters["pvalidate_failures"] > 0          # every 2M attempt is a size mismatch
    assert r4.counters["pvalidate_failures"] == 0
    assert r4.counters["psc_entries"] == PAGES - IMAGE_PAGES  # one 4K entry per page
    with pytest.raises(ValueError, match="try_accept_one"):
        run(platform="tdx", options={"accept": "4K"})


def test_actor_attribution_follows_the_rmpupdate_placement():
    """The point of the eager-vs-fault-time debate: who pays for RMPUPDATE."""
    ft = run(policy="fault-time", options={"prealloc": "true"})
    ep = run(policy="eager-post", options={"prealloc": "true"})
    unit = ft.by_op["rmpupdate"] // ft.counters["rmpupdate"]
    assert ft.by_actor_op["vcpu0"]["rmpupdate"] == (PAGES - IMAGE_PAGES) * unit
    assert ft.by_actor_op["vmm"]["rmpupdate"] == IMAGE_PAGES * unit  # SNP_LAUNCH_UPDATE only
    assert ep.by_actor_op["vmm"]["rmpupdate"] == ep.by_op["rmpupdate"]  # all in the ioctl
    assert ep.counters["sleep_in_atomic"] == 0
    el = run(policy="eager-locked", options={"prealloc": "true"})
    assert el.counters["sleep_in_atomic"] > 0  # the directmap change under mmu_lock
    # Without preallocation the eager designs find nothing allocated (kernel-semantics.md §7.7).
    assert run(policy="eager-post").by_actor_op["vmm"]["rmpupdate"] == IMAGE_PAGES * unit


def test_modeled_time_adds_up():
    r = run(workload="mixed", options={"ops": "60"})
    assert r.modeled_ns == sum(r.by_actor.values()) == sum(r.by_op.values())
    assert r.modeled_ns == sum(sum(c.values()) for c in r.by_actor_op.values())
    assert r.modeled_ns == sum(p.modeled_ns for p in r.phases)
    for name in ("pf_taken", "attr_stores"):
        assert r.counters[name] == sum(p.counters.get(name, 0) for p in r.phases)


def test_swiotlb_churn_counts():
    r = run(workload="swiotlb", options={"ops": "50", "touches": "3"})
    churn = next(p for p in r.phases if p.name == "churn")
    # Each round trip: the VMM converts the page twice (PSC -> KVM_SET_MEMORY_ATTRIBUTES).
    assert churn.counters["gfns_converted"] == 100
    assert churn.counters["gmem_pages_freed"] == 50     # the to-shared hole punch
    assert churn.counters["rmpupdate"] == 100           # back to shared at the punch, private on refault


def test_balloon_refaults_what_it_discarded():
    r = run(workload="balloon", options={"cycles": "1", "fraction": "0.5"})
    infl = next(p for p in r.phases if p.name == "inflate")
    defl = next(p for p in r.phases if p.name == "deflate")
    freed = infl.counters["gmem_pages_freed"]
    assert freed == (PAGES - IMAGE_PAGES) // 2 // 512 * 512
    assert defl.counters["gmem_pages_allocated"] == freed
    assert defl.counters["rmpupdate"] == freed


def test_discard_false_keeps_private_folios():
    keep = run(workload="swiotlb", options={"ops": "20"}, discard=False)
    assert keep.counters["gmem_pages_freed"] == 0


@pytest.mark.parametrize("platform", ["snp", "tdx", "sw_protected"])
@pytest.mark.parametrize("workload", ["boot", "swiotlb", "virtio", "balloon", "migration", "mixed"])
def test_every_workload_runs_and_checks(platform, workload):
    opts = {"ops": "40"} if workload in ("swiotlb", "mixed") else {"cycles": "2"} if workload == "virtio" else {}
    cfg = E.Config(platform=platform, memory="32M", workload=workload, options=opts, vcpus=2,
                   policy=E.PLATFORM_POLICIES[platform][-1])
    vm, ctx = E._build(cfg, 5, None)
    W.get(workload).run(ctx, **W.parse_options(W.get(workload), opts))
    vm.check()
    assert ctx.guests[0].vcpu.vm is vm


# -- determinism, purity, pickling ------------------------------------------------------------


def test_same_seed_same_result_other_seed_other_result():
    a = run(workload="mixed", options={"ops": "80"}, seed=7)
    b = run(workload="mixed", options={"ops": "80"}, seed=7)
    c = run(workload="mixed", options={"ops": "80"}, seed=8)
    assert a.counters == b.counters and a.modeled_ns == b.modeled_ns and a.by_actor_op == b.by_actor_op
    assert (c.counters, c.modeled_ns) != (a.counters, a.modeled_ns)


def test_result_and_config_pickle():
    r = run(workload="swiotlb", options={"ops": "10"})
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.counters == r.counters and r2.config == r.config and r2.phases == r.phases
    assert r2.to_dict() == r.to_dict()


def test_result_records_its_cost_model():
    r = run(costs={"rmpupdate": "800ns"})
    assert r.cost_model["costs"]["rmpupdate"]["value_ns"] == 800
    assert r.cost_model["fingerprint"] == r.cost_fingerprint
    base = run()
    assert r.cost_fingerprint != base.cost_fingerprint
    assert r.by_op["rmpupdate"] == 800 * r.counters["rmpupdate"]
    d = r.to_dict()
    for key in ("pkvm_version", "config", "seed", "cost_model", "counters", "row", "phases"):
        assert key in d


def test_compare_runs_each_policy_with_the_same_seed():
    rs = E.compare(E.Config(memory=SMALL, workload="swiotlb", options={"ops": "20"}), seed=3)
    assert [r.policy for r in rs] == list(E.PLATFORM_POLICIES["snp"])
    assert len({r.counters["gfns_converted"] for r in rs}) == 1  # same random pages


def test_sweep_orders_by_memory_then_policy():
    rs = E.sweep(E.Config(), ["32M", "64M"], ["fault-time", "eager-post"])
    assert [(r.config.memory >> 20, r.policy) for r in rs] == [(32, "fault-time"), (32, "eager-post"),
                                                               (64, "fault-time"), (64, "eager-post")]
    assert rs[2].counters["rmpupdate"] == 2 * rs[0].counters["rmpupdate"]


# -- the error contract -------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"platform": "sev"}, "platform"),
    ({"memory": "12Q"}, "size"),
    ({"memory": "3M"}, "multiple of 2M"),
    ({"memory": "4M"}, "at least"),
    ({"workload": "bogus"}, "unknown workload"),
    ({"options": {"nope": 1}}, "no option 'nope'"),
    ({"options": {"accept": "8K"}}, "4K or 2M"),
    ({"policy": "7.0"}, "7.0"),
    ({"costs": {"rmpupdate": "fast"}}, "rmpupdate"),
    ({"costs": {"no_such_op": "1ns"}}, "no_such_op"),
    ({"vcpus": 0}, "vcpus"),
    ({"shared_backing": "1g"}, "shared_backing"),
    ({"image": "1G", "memory": "64M"}, "image"),
    # discard="no" is truthy: taken for True, the run failed later in Vmm with a TypeError
    ({"discard": "no"}, "discard 'no' must be a bool"),
    ({"discard": 0}, "discard 0 must be a bool"),
    ({"discard": None}, "discard None must be a bool"),
    # an int path is a file descriptor to open(): trace=5 wrote the trace to fd 5 and closed it
    ({"trace": 5}, "trace 5 must be None or a file name"),
    ({"timeline": ""}, "timeline '' must be None or a file name"),  # wrote no timeline, silently
    ({"gantt": b"g.png"}, "gantt b'g.png' must be None or a file name"),
    ({"cost_file": 3}, "cost_file 3 must be None or a file name"),
    # float(True) is 1.0: the balloon took all of RAM per round
    ({"workload": "balloon", "options": {"fraction": True}}, "option fraction=True: True is not a fraction"),
    ({"workload": "migration", "options": {"resident": False}}, "option resident=False: False is not a fraction"),
])
def test_bad_config_is_a_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        E.Config(**kw)


_COUNT_CAPS = [("swiotlb", "ops", 10**9), ("swiotlb", "touches", 10**6), ("virtio", "cycles", 10**7),
               ("virtio", "devices", 65536), ("virtio", "queues", 1024), ("virtio", "io", 10**6),
               ("balloon", "cycles", 10**5), ("migration", "devices", 65536), ("mixed", "ops", 10**9),
               ("implicit", "ops", 10**9)]


@pytest.mark.parametrize("workload, option, cap", _COUNT_CAPS)
def test_a_count_past_its_cap_is_a_value_error(workload, option, cap):
    """``options={"ops": 10**20}`` was accepted and would have run for years. Each count option
    has a cap (docs/workloads.md, "Caps on counts"): the cap is accepted, one more is refused
    naming the option and the range, and ``pkvm workloads``' help text states the range."""
    shown = f"10^{len(str(cap)) - 1}" if cap >= 10**4 and cap == 10 ** (len(str(cap)) - 1) else str(cap)
    if workload in ("swiotlb", "virtio"):  # their nested counts' product is capped too
        others = {k: 1 for k in W.get(workload).nested if k != option}
    else:
        others = {}
    W.parse_options(W.get(workload), {**others, option: cap})
    for value in (cap + 1, 10**20, str(10**20)):
        with pytest.raises(ValueError, match=rf"workload '{workload}' option {option}=.*: \d+ is more than "
                                             rf"{re.escape(shown)}; expected an integer from 0 to {re.escape(shown)}$"):
            E.Config(workload=workload, options={**others, option: value})
    assert W.get(workload).options[option].help.endswith(f"(0 to {shown})")


@pytest.mark.parametrize("workload, options, steps", [
    ("swiotlb", {"ops": 10**9, "touches": 2}, "ops=1000000000 x touches=2: the run would repeat its innermost step "
                                              "2000000000 times, more than 10^9"),
    ("virtio", {"cycles": 10**7, "io": 40}, "cycles=10000000 x devices=4 x queues=2 x io=40: the run would "
                                            "repeat its innermost step 3200000000 times"),
])
def test_nested_counts_are_capped_together(workload, options, steps):
    """Each count within its cap, their product not: ``ops=10**9 touches=10**6`` is 10^15 touches."""
    with pytest.raises(ValueError, match=re.escape(f"workload '{workload}' options {steps}")):
        E.Config(workload=workload, options=options)


def test_balloon_rounds_are_capped_with_the_memory():
    """A balloon round hands back ``fraction`` of the RAM's chunks, so ``cycles`` alone does not
    bound the run: 10^5 rounds were accepted at 1T (13.1 * 10^9 chunks, days). The chunks over
    all rounds are capped at 10^9 like nested counts; the refusal names the options, the memory
    and the most rounds of that size, and that many is accepted."""
    per_round = int((2**40 // 2**21 - 1) * 0.25)  # the default 2M image takes the first chunk
    most = 10**9 // per_round
    E.Config(memory="1T", workload="balloon", options={"cycles": most})
    E.Config(memory="64G", workload="balloon", options={"cycles": 10**5})  # the count's own cap fits 64G
    with pytest.raises(ValueError, match=re.escape(
            f"workload 'balloon' options cycles={most + 1}, fraction=0.25, chunk=2M at 1T of memory: the rounds "
            f"would hand back {(most + 1) * per_round:,} chunks ({per_round:,} a round), more than 10^9; lower "
            f"cycles or fraction (at most {most:,} rounds of this size)")):
        E.Config(memory="1T", workload="balloon", options={"cycles": most + 1})
    with pytest.raises(ValueError, match=r"a round\), more than 10\^9; lower fraction, or use a 2M chunk$"):
        E.Config(memory="64T", workload="balloon", options={"cycles": 1, "chunk": "4K"})
    E.Config(memory="64T", workload="balloon", options={"cycles": 0, "chunk": "4K"})  # no rounds: nothing to cap


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        E.run(E.Config(memory=SMALL), -1)
    with pytest.raises(TypeError, match="pkvm.experiments.Config"):
        E.run({"memory": SMALL})  # type: ignore[arg-type]


def test_workload_failure_is_a_kvm_error():
    # A region that cannot fit is a ValueError before anything runs.
    with pytest.raises(ValueError, match="the workload needs a 128M private region between gpa 0x200000 and 0x4000000"):
        run(workload="virtio", options={"buffers": "128M"})


def test_tdx_huge_pages_needs_a_4k_image():
    """Known gap of the beyond-upstream mode: the TD build adds only a large folio's first
    page. The configuration refuses a larger image before anything runs (it failed in the
    run, EEXIST); the VM itself still answers EEXIST."""
    for image in ("8K", "2M"):
        with pytest.raises(ValueError, match=f"image {image} must be 4K under policy 'tdx-huge-pages'"):
            E.Config(platform="tdx", policy="tdx-huge-pages", image=image, memory=SMALL)
    with pytest.raises(ValueError, match="must be 4K under policy '6.19\\+gmem_max_order=9'"):
        E.Config(platform="tdx", policy="6.19+gmem_max_order=9", image="8K", memory=SMALL)
    vm = pkvm.VM("tdx", policy="tdx-huge-pages")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 64 << 20)
    with pytest.raises(KvmError, match="already populated") as exc:
        vmm.launch([(0, 8192, True)])
    assert exc.value.errno == 17  # EEXIST
    r = run(platform="tdx", policy="tdx-huge-pages", image="4K", workload="mixed", options={"ops": "50"})
    assert r.counters["pages_2m"] > 0


def test_a_phase_inside_another_is_part_of_it():
    """``mixed`` runs balloon rounds (``inflate`` / ``deflate`` phases) inside its ``steady``
    phase: they are part of it, not phases of their own, so the phases do not overlap and add
    up to the run, and they do not stop the vCPUs: the VMM's inflate runs beside a vCPU's task
    (with one vCPU, the TD's removals under ``mmu_lock`` make the vCPU wait; the critical path
    is below the CPU time). (Each round was two more phases, 436 at 4 GiB, that added up to
    1.25 times the run, and stopped every vCPU twice.)"""
    r = run(platform="tdx", memory="4G", workload="mixed", options={"ops": "150"})
    assert [p.name for p in r.phases] == ["launch", "accept", "swiotlb-pool", "steady"]
    assert sum(p.modeled_ns for p in r.phases) == r.modeled_ns
    assert sum(p.elapsed_ns for p in r.phases) == r.critical_path_ns < r.modeled_ns
    assert r.actors["vcpu0"]["lock_wait_ns"] > 0 and r.locks["mmu_lock"]["wait_ns"] > 0


def test_replay_needs_its_file():
    with pytest.raises(ValueError, match="needs option 'file'"):
        E.Config(workload="replay")


def test_replay_of_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        run(workload="replay", options={"file": str(tmp_path)})


def test_module_docstring_examples():
    import doctest

    result = doctest.testmod(E)
    assert result.failed == 0 and result.attempted > 0


def test_jobs_farm_out_to_processes_with_identical_results():
    cfg = E.Config(memory="32M", workload="swiotlb", options={"ops": "30"})
    serial = E.sweep(cfg, ["32M", "64M"], ["fault-time", "eager-post"], seed=4)
    seen = []
    farmed = E.sweep(cfg, ["32M", "64M"], ["fault-time", "eager-post"], seed=4, jobs=2,
                     progress=lambda p, f: seen.append((p, f)))
    assert [(r.config.memory, r.policy, r.counters, r.modeled_ns) for r in farmed] == [
        (r.config.memory, r.policy, r.counters, r.modeled_ns) for r in serial]
    assert len(seen) == 4 and all(f == 1.0 for _, f in seen)
    with pytest.raises(ValueError, match="jobs"):
        E.compare(cfg, jobs=0)


def test_mmu_lock_hold_time_orders_the_eager_designs():
    """The RFC v8 debate (kernel-semantics.md §7.7): RMPUPDATE (and its direct-map change) inside mmu_lock holds off every vCPU
    fault; the split design keeps only the RMPUPDATE there; the post-lock design none."""
    held = {r.policy: r.counters["mmu_lock_held_ns"]
            for r in E.compare(E.Config(memory=SMALL, options={"prealloc": "true"}))}
    unit = E.Config().cost_model().ns("rmpupdate")
    assert held["fault-time"] == held["eager-post"] == 0      # nothing mapped at boot to zap
    assert held["eager-split"] == (PAGES - IMAGE_PAGES) * unit
    assert held["eager-locked"] > held["eager-split"]


_TEXT = st.one_of(st.text(max_size=12), st.integers(-2**70, 2**70), st.none(), st.booleans(),
                  st.floats(allow_nan=True), st.sampled_from(["4K", "2M", "1T", "0", "-1", "1e3", "true", "64Q"]))


@settings(deadline=None, max_examples=200)
@given(field=st.sampled_from(["platform", "memory", "workload", "policy", "vcpus", "shared_backing", "image",
                              "discard"]), value=_TEXT)
def test_config_rejects_garbage_cleanly(field, value):
    """Bad input never crashes: a Config either builds or raises ValueError / TypeError."""
    try:
        E.Config(**{field: value, **({"memory": "64M"} if field != "memory" else {})})
    except (ValueError, TypeError):
        pass


@settings(deadline=None, max_examples=200)
@given(workload=st.sampled_from(sorted(W.WORKLOADS)), key=st.sampled_from(
    ["ops", "touches", "accept", "prealloc", "cycles", "fraction", "chunk", "ring", "buffers", "io", "devices",
     "queues", "resident", "file", "bogus"]), value=_TEXT)
def test_workload_options_reject_garbage_cleanly(workload, key, value):
    try:
        E.Config(memory="64M", workload=workload, options={key: value})
    except (ValueError, TypeError):
        pass


@settings(deadline=None, max_examples=100)
@given(op=st.sampled_from(["rmpupdate", "npf_fault", "remote_tlb_flush", "nope", ""]), value=_TEXT)
def test_cost_overrides_reject_garbage_cleanly(op, value):
    try:
        E.Config(memory="64M", costs={op: value})
    except (ValueError, TypeError):
        pass


def test_a_policy_the_platform_refuses_is_a_config_error():
    with pytest.raises(ValueError, match=r"cannot run on an snp VM \(KVM_CREATE_VM: an SNP VM needs.*snp policies: 6.11"):
        E.Config(policy="rfc-v8")


def test_migration_with_more_vcpus_than_chunks_runs():
    """16 vCPUs re-accepting 3 chunks of 2M: the vCPUs past the last chunk have nothing to do
    (once a RangeMap "start > end" error on an empty share)."""
    r = E.run(E.Config(memory="8M", vcpus=16, workload="migration", options={"buffers": "4K"}), 0)
    assert r.counters["gfns_accessed"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_migration_restores_shared_ranges_apart_from_each_other(seed, monkeypatch):
    """The source's shared ranges (the SWIOTLB pool and one buffer pool per device) are
    different memory: the incoming VMM restores each once, and none overlaps another. They
    were drawn before any was marked, so two could overlap (64M, seed 2: two device pools),
    converting some pages twice and touching them twice on resume."""
    from pkvm.actors.vmm import Vmm

    ranges = []
    convert = Vmm.convert_memory

    def record(self, gpa, size, private, *args, **kwargs):
        if not private:
            ranges.append((gpa, gpa + size))
        return convert(self, gpa, size, private, *args, **kwargs)

    monkeypatch.setattr(Vmm, "convert_memory", record)
    E.run(E.Config(memory="64M", workload="migration"), seed)
    assert len(ranges) == 5  # the pool and four devices' buffers
    ranges.sort()
    assert all(e <= s for (_s, e), (s, _e) in zip(ranges, ranges[1:]))


def test_migration_with_more_devices_than_fit_is_refused():
    """1000 device pools of 2M cannot fit apart in 64M of RAM (they used to overlap)."""
    with pytest.raises(pkvm.ConfigError, match=r"no private 2M region left in 64M of RAM"):
        E.run(E.Config(memory="64M", workload="migration", options={"devices": 1000}), 0)


def test_a_workload_that_does_not_fit_says_what_to_change():
    with pytest.raises(pkvm.ConfigError, match=r"needs a 4M private region between gpa 0x600000 and 0x800000, which "
                                               r"8M of RAM with a 6M image does not "
                                               r"leave: give more memory \(Config\(memory=\.\.\.\), --memory\), a smaller image "
                                               r"\(Config\(image=\.\.\.\), --image\) or smaller workload options"):
        E.run(E.Config(memory="8M", image="6M", workload="migration", options={"buffers": "4M"}), 0)


def test_mixed_without_room_for_its_swiotlb_pool_runs_on_private_memory():
    """2M of RAM above a 6M image leaves no room for the SWIOTLB pool: mixed shares none, and
    its implicit conversions pick among all of that RAM (they picked above a pool that was
    never shared, an empty range, and the run failed: "between gpa 0x800000 and 0x800000")."""
    r = E.run(E.Config(memory="8M", image="6M", workload="mixed", options={"ops": 200}), 0)
    assert [p.name for p in r.phases][-2:] == ["swiotlb-pool", "steady"]
    assert r.phases[-2].counters.get("gfns_converted", 0) == 0
    assert r.counters["memory_fault_exits"] > 0  # the implicit conversions ran
    with pytest.raises(pkvm.ConfigError, match=r"no private 256K region left in 64M of RAM: give more memory \(Config\(memory=\.\.\.\), --memory\)"):
        E.run(E.Config(memory="64M", workload="virtio", options={"devices": 60000}), 0)
    assert issubclass(pkvm.ConfigError, ValueError)  # what the run raised before (a ValueError)


class _RamOnly:
    """The part of a workload Context that maps RAM offsets to gpas."""

    ram_gpa = W.Context.ram_gpa

    def __init__(self, ram: list[tuple[int, int]]) -> None:
        self.ram = ram


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 64)), min_size=1, max_size=4),
       st.sampled_from([1, 2, 512]), st.integers(1, 4), st.data())
def test_balloon_chunk_gpas_follow_the_ram_layout(pieces, chunk_pages, unit, data):
    """_balloon_round's chunk numbering equals ram_gpa's, chunk by chunk (fewer than 64 chunks
    and more), for RAM ranges on chunk boundaries (the q35 layouts) and off them (the per-chunk
    fallback)."""
    chunk = chunk_pages << 12
    ram, pos = [], 0
    for gap, size in pieces:  # ranges in gpa order with holes between them
        start = pos + gap * unit * 4096
        ram.append((start, start + size * unit * 4096))
        pos = ram[-1][1]
    ctx = _RamOnly(ram)
    total = sum(b - a for a, b in ram) // chunk
    if not total:
        return
    chunks = data.draw(st.lists(st.integers(0, total - 1), max_size=150))  # both paths (numpy from 64)
    want = [ctx.ram_gpa(c * chunk) // chunk for c in chunks]
    assert W._chunk_gpas(ctx, chunks, chunk) == want  # type: ignore[arg-type]


def test_balloon_chunk_gpas_of_the_q35_layouts():
    """The 1 TiB and 3 GiB guests' RAM (split around the PCI hole): 2M chunks all over it."""
    for memory in (3 << 30, 1 << 40):
        ram = W.ram_ranges(memory)
        # q35: RAM below 2 GiB and from 4 GiB, the memslots' pieces joined.
        assert ram == [(0, 2 << 30), (4 << 30, memory + (2 << 30))]
        assert sum(size for _gpa, size, _off in q35_ram_layout(memory)) == memory
        ctx = _RamOnly(ram)  # the ranges Context builds from the layout
        chunks = list(range(0, memory >> 21, 7)) + [(memory >> 21) - 1]
        assert W._chunk_gpas(ctx, chunks, 1 << 21) == [ctx.ram_gpa(c << 21) >> 21 for c in chunks]  # type: ignore[arg-type]


def test_directmap_pages_are_a_count():
    """``directmap.fragmented_pages`` counts pages: an int in the result, its metrics and its
    JSON (it was a float, ``123.0``), while ``fragmented_fraction`` stays a float."""
    r = E.run(E.Config(platform="snp", memory="64M", policy="eager-post"), seed=1)
    assert type(r.directmap["fragmented_pages"]) is int
    assert r.directmap["fragmented_pages"] > 0
    assert type(r.directmap["fragmented_fraction"]) is float
    assert type(r.metrics()["directmap.fragmented_pages"]) is int
    d = json.loads(json.dumps(r.to_dict()))
    assert type(d["directmap"]["fragmented_pages"]) is int


@pytest.mark.parametrize("workload,options", [("swiotlb", {"ops": "3000"}), ("virtio", {"cycles": "4"}),
                                              ("boot", {})])
def test_progress_only_rises_and_ends_at_one(workload, options):
    """``run(progress=)``: the fractions rise and the last is 1.0; a workload's boot is the
    first tenth (its boot reported 1.0, then its own loop started again at 0.0 and stopped
    at 0.68)."""
    seen: list[float] = []
    E.run(E.Config(memory=SMALL, workload=workload, options=options), 1, progress=seen.append)
    assert seen and seen[-1] == 1.0
    assert all(a < b for a, b in zip(seen, seen[1:])), seen
    if workload != "boot":
        assert seen[0] <= 0.1 and len(seen) > 2
