"""A replay under cost overrides (docs/workloads.md, "Replay"): the traced run's modeled time is
its traced work, which the replay re-runs at its own prices, plus the untraced work (PVALIDATE,
TDG.MEM.PAGE.ACCEPT, ...), kept at the trace's prices. The replay re-prices its work at the
trace's prices (the trailer's cost_model and price.OP fields) before it attributes the rest
to the untraced work; at the trace's own prices nothing changes."""

import pathlib
import re

import pytest

from pkvm import experiments as E
from pkvm.cost.model import CostModel
from pkvm._units import format_ns
from pkvm.experiments.trace import trailer_fields

MODELED = "modeled time"
RUNS = {"snp": ("boot", {}), "tdx": ("swiotlb", {"ops": 20}), "sw_protected": ("swiotlb", {"ops": 20})}


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    out = {}
    for plat, (wl, opts) in RUNS.items():
        path = str(d / f"{plat}.txt")
        r = E.run(E.Config(platform=plat, memory="64M", workload=wl, options=opts, trace=path))
        out[plat] = (path, r)
    return out


def _replay(path, plat, costs=None):
    r = E.run(E.Config(platform=plat, memory="64M", workload="replay", options={"file": path}, costs=costs or {}))
    notes = [n for n in r.notes if MODELED in n]
    assert len(notes) <= 1
    return r, (notes[0] if notes else None)


def _without_prices(path, tmp_path):
    """The trace as pkvm wrote it before the trailer recorded its prices."""
    text = pathlib.Path(path).read_text().splitlines()
    old = [re.sub(r" (cost_model|price\.\w+)=\S+", "", ln) if ln.startswith("# pkvm end") else ln for ln in text]
    out = tmp_path / "old.txt"
    out.write_text("\n".join(old) + "\n")
    return str(out)


def _untraced_part(note):
    """What the note attributes to the untraced work: 'X (P %) is WHAT: op A, op B'."""
    m = re.search(r"; (\S+ \S+ \([-\d.]+ %\) is .*)$", note)
    assert m, note
    return m.group(1).replace(" (at the trace's prices)", "")


@pytest.mark.parametrize("plat", ["snp", "tdx"])
def test_the_trailer_records_the_prices(traces, plat):
    path, r = traces[plat]
    end = trailer_fields(path)
    assert end["cost_model"] == CostModel.default(plat).fingerprint() == r.cost_fingerprint
    prices = {k[6:]: int(v) for k, v in end.items() if k.startswith("price.")}
    assert set(prices) == {k[3:] for k in end if k.startswith("op.")} - {"remote_tlb_flush"} or \
        set(prices) == {k[3:] for k in end if k.startswith("op.")}
    model = CostModel.default(plat)
    for op, p in prices.items():
        if op not in ("remote_tlb_flush", "directmap_tlb_flush"):
            assert p == model.ns(op)
        assert int(end[f"op.{op}"]) % p == 0


@pytest.mark.parametrize("plat", ["snp", "tdx"])
def test_at_the_trace_prices_the_note_is_unchanged(traces, plat, tmp_path):
    """The note a replay at the trace's prices gives, the same for a trace without prices (what
    pkvm wrote before): the traced run's total less the replay's is the untraced work."""
    path, rec = traces[plat]
    r, note = _replay(path, plat)
    _r_old, note_old = _replay(_without_prices(path, tmp_path), plat)
    assert note == note_old
    gap = rec.modeled_ns - r.modeled_ns
    assert gap > 0
    assert note.startswith(f"modeled time not reproduced: the traced run modeled {format_ns(rec.modeled_ns)}, "
                           f"the replay {format_ns(r.modeled_ns)}; {format_ns(gap)} (")


@pytest.mark.parametrize("plat", ["snp", "tdx"])
@pytest.mark.parametrize("costs", [{"npf_fault": "5us"}, {"attr_store": "1ns"}, {"npf_fault": "1us", "attr_store": "2us"}])
def test_an_override_of_traced_work_changes_the_traced_share_only(traces, plat, costs):
    path, rec = traces[plat]
    base, note0 = _replay(path, plat)
    r, note = _replay(path, plat, costs)
    assert r.modeled_ns != base.modeled_ns  # the override re-priced the traced work
    assert _untraced_part(note) == _untraced_part(note0)  # the untraced work, amounts and ops, is kept
    assert (f"the traced run modeled {format_ns(rec.modeled_ns)}, {format_ns(base.modeled_ns)} of it the "
            f"traced work this replay re-runs, which its prices make {format_ns(r.modeled_ns)}; ") in note


def test_an_override_of_untraced_work_keeps_the_trace_prices(traces):
    """PVALIDATE is not replayed: its time stays the trace's, whatever this run's price."""
    path, _rec = traces["snp"]
    _base, note0 = _replay(path, "snp")
    _r, note = _replay(path, "snp", {"pvalidate_4k": "5us", "pvalidate_2m": "1ns"})
    assert note == note0


@pytest.mark.parametrize("costs", [{"npf_fault": "5us"}, {"attr_store": "1us"}])
def test_sw_protected_reproduces_everything_under_overrides_too(traces, costs):
    """SW_PROTECTED's guest work is all traced: no untraced work at any prices (the gap was the
    re-pricing, and was reported as untraced work)."""
    path, _rec = traces["sw_protected"]
    assert _replay(path, "sw_protected")[1] is None
    assert _replay(path, "sw_protected", costs)[1] is None


def test_without_recorded_prices_an_override_is_not_compared(traces, tmp_path):
    path, rec = traces["snp"]
    r, note = _replay(_without_prices(path, tmp_path), "snp", {"npf_fault": "5us"})
    assert note.startswith(f"modeled time not compared: the traced run modeled {format_ns(rec.modeled_ns)} and "
                           f"this replay runs another cost model ({format_ns(r.modeled_ns)})")


def test_a_zero_price_cannot_be_repriced(traces):
    """Events charged 0 ns cannot be counted back: not compared rather than called untraced."""
    path, _rec = traces["snp"]
    _r, note = _replay(path, "snp", {"rmpupdate": "0ns"})
    assert note.startswith("modeled time not compared") and "rmpupdate" not in note
