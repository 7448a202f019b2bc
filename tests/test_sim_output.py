"""pkvm.sim.stats, recorder, chrome and gantt: distributions, the event log and its two renderings."""

import io
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import simpy
from hypothesis import given
from hypothesis import strategies as st

from pkvm.sim.chrome import write_chrome_trace
from pkvm.sim.gantt import _PALETTE, _colour, _merge_spans, _time_unit, plot_gantt
from pkvm.sim.locks import RWLock
from pkvm.sim.recorder import (CAT_BUSY, CAT_IPI_STALL, CAT_LOCK_HOLD, CAT_LOCK_WAIT,
                               Recorder)
from pkvm.sim.stats import Distribution

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ------------------------------------------------------------------ Distribution


def _expand(samples):
    return sorted(v for v, c in samples for _ in range(c))


def _nearest_rank(expanded, q):
    """The textbook nearest-rank percentile of an already expanded, sorted list."""
    if not expanded:
        return 0
    # the rank of q as written (99.9 is 999/10): q / 100 * n in floats is 1000 for q=99.9 and
    # n=1000, one above the rank
    return expanded[max(math.ceil(Fraction(str(q)) * len(expanded) / 100), 1) - 1]


SAMPLES = st.lists(st.tuples(st.integers(-50, 10**6), st.integers(1, 40)), max_size=60)


@given(SAMPLES)
def test_distribution_matches_brute_force_expansion(samples):
    """Weighted nearest-rank stats equal those of the expanded list of samples."""
    d = Distribution()
    for v, c in samples:
        d.add(v, count=c)
    expanded = _expand(samples)
    assert d.count == len(expanded)
    assert d.total == sum(expanded)
    assert d.max == (max(expanded) if expanded else 0)
    assert d.mean == (sum(expanded) / len(expanded) if expanded else 0.0)
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert d.percentile(q) == _nearest_rank(expanded, q), q
    assert d.as_dict() == {"count": len(expanded), "p50": _nearest_rank(expanded, 50),
                           "p99": _nearest_rank(expanded, 99), "max": d.max}


@given(SAMPLES, st.randoms(use_true_random=False))
def test_distribution_ignores_add_order(samples, rnd):
    """Statistics depend only on the multiset, and are the same after compaction."""
    a, b = Distribution(), Distribution()
    for v, c in samples:
        a.add(v, c)
    shuffled = list(samples)
    rnd.shuffle(shuffled)
    for v, c in shuffled:
        b.add(v, c)
    assert a.as_dict() == b.as_dict() and a.total == b.total


def test_distribution_memory_follows_distinct_values():
    """1000 adds of 10 distinct values keep 10 counts, losing no sample."""
    rng = np.random.default_rng(7)
    values = rng.integers(0, 10, size=1000).tolist()
    d = Distribution()
    for v in values:
        d.add(v)
    assert len(d._hist) == len(set(values)) == 10  # one count per distinct value, not per add
    expanded = sorted(values)
    assert d.count == 1000 and d.total == sum(values)
    for q in (1, 50, 99, 100):
        assert d.percentile(q) == _nearest_rank(expanded, q)


def test_equal_int_and_float_samples_are_one_value():
    """Values that compare equal count together, reported as the first one added."""
    d = Distribution()
    d.add(7, count=2)
    d.add(7.0)
    d.add(2.5)
    assert d.count == 4 and len(d._hist) == 2
    assert d.p50 == 7 and type(d.p50) is int and d.percentile(25) == 2.5


def test_distribution_nearest_rank_examples():
    """Nearest rank picks a sample, never an interpolation; the median of [1, 2] is 1."""
    d = Distribution()
    d.add(1)
    d.add(2)
    assert (d.p50, d.p99, d.max) == (1, 2, 2)
    d = Distribution()
    for v in range(1, 101):
        d.add(v)
    assert (d.p50, d.p99, d.percentile(99.5), d.percentile(0)) == (50, 99, 100, 1)
    d.add(10**9, count=10**6)  # a batch costs one pair
    assert d.p50 == 10**9 and d.count == 10**6 + 100


def test_numpy_scalars_come_back_as_python_numbers():
    """numpy samples are stored as int/float, so the summary is JSON-ready."""
    d = Distribution()
    d.add(np.int64(7), count=np.int64(3))
    d.add(np.float64(2.5))
    assert d.as_dict() == {"count": 4, "p50": 7, "p99": 7, "max": 7}
    assert {type(v) for v in d.as_dict().values()} == {int}
    assert json.dumps(d.as_dict()) == '{"count": 4, "p50": 7, "p99": 7, "max": 7}'
    assert d.percentile(25) == 2.5 and type(d.percentile(25)) is float


def test_empty_distribution_reports_zero():
    """No samples: every statistic is 0."""
    d = Distribution()
    assert d.as_dict() == {"count": 0, "p50": 0, "p99": 0, "max": 0}
    assert (d.total, d.mean, d.percentile(75)) == (0, 0.0, 0)


def test_negative_max_is_the_true_max():
    """max tracks negative samples too (it is not clamped at 0)."""
    d = Distribution()
    d.add(-5)
    d.add(-7)
    assert d.max == -5 and d.p99 == -5


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [(("1",), TypeError, r"value must be a real number, got str"),
     ((True,), TypeError, r"value must be a real number, got bool"),
     ((float("nan"),), ValueError, r"value must be finite, got nan"),
     ((1, 0), ValueError, r"count must be >= 1, got 0"),
     ((1, 2.0), TypeError, r"count must be an int, got float")],
    ids=["str", "bool", "nan", "count-0", "count-float"])
def test_distribution_refuses_bad_samples(args, exc, match):
    """A bad sample raises and adds nothing."""
    d = Distribution()
    d.add(3)
    with pytest.raises(exc, match=match):
        d.add(*args)
    assert d.as_dict() == {"count": 1, "p50": 3, "p99": 3, "max": 3}


def test_percentile_refuses_bad_q():
    """q must be a number in [0, 100]."""
    d = Distribution()
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\], got 101"):
        d.percentile(101)
    with pytest.raises(TypeError, match=r"q must be a real number, got str"):
        d.percentile("50")


def test_a_float_percentile_is_the_rank_of_its_decimal_value():
    """The rank of a float ``q`` is computed from the decimal it is written as: with 1,000
    samples 1..1000, p99.9 is the 999th (99.9 as a binary float is a hair above 99.9, whose
    rank would be the 1000th) and p12.3 the 123rd."""
    d = Distribution()
    for v in range(1, 1001):
        d.add(v)
    assert (d.percentile(99.9), d.percentile(12.3), d.percentile(0.1)) == (999, 123, 1)
    d.add(1001, count=1000)
    assert d.percentile(99.9) == 1001 and d.percentile(50) == 1000


def test_percentile_refuses_a_bool_q():
    """``True`` is not a percentile (bool is refused as an int subclass would not be)."""
    d = Distribution()
    d.add(1)
    with pytest.raises(TypeError, match=r"q must be a real number, got bool"):
        d.percentile(True)


# ------------------------------------------------------------------ Recorder


def test_recorder_tracks_in_first_use_order():
    """Tracks appear on first use (or add_track) and keep that order."""
    r = Recorder()
    r.instant("vmm", "start", 0, "misc")
    r.slice("vcpu1", "fault", 5, 9, CAT_BUSY)
    r.add_track("vcpu0")
    r.slice("vmm", "ioctl", 1, 3, CAT_BUSY, {"gfns": 512})
    r.add_track("vmm")
    assert r.tracks == ("vmm", "vcpu1", "vcpu0")
    assert list(r.iter_slices("vmm")) == [("ioctl", 1, 3, CAT_BUSY, {"gfns": 512})]
    assert list(r.iter_instants("vmm")) == [("start", 0, "misc", None)]
    assert list(r.iter_slices("nope")) == []
    assert (r.n_slices(), r.n_instants(), r.n_slices("vcpu0"), len(r)) == (2, 1, 0, 3)
    assert r.span() == (0, 9)
    assert Recorder().span() == (0, 0)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [(lambda r: r.slice("t", "x", 5, 4, CAT_BUSY), ValueError, r"'x' on 't' ends before it starts: \[5, 4\)"),
     (lambda r: r.slice(1, "x", 0, 1, CAT_BUSY), TypeError, r"track must be a str, got int"),
     (lambda r: r.slice("t", None, 0, 1, CAT_BUSY), TypeError, r"name must be a str"),
     (lambda r: r.slice("t", "x", 0, 1, 3), TypeError, r"cat must be a str"),
     (lambda r: r.slice("t", "x", 0, 1, CAT_BUSY, [1]), TypeError, r"args must be a dict or None"),
     (lambda r: r.slice("t", "x", "0", 1, CAT_BUSY), TypeError, r"start_ns must be a real number"),
     (lambda r: r.instant("t", "x", float("inf"), "c"), ValueError, r"t_ns must be finite"),
     (lambda r: r.slice("t", "x", 0, float("nan"), CAT_BUSY), ValueError, r"end_ns must be finite"),
     (lambda r: r.slice("t", "x", 0, float("inf"), CAT_BUSY), ValueError, r"end_ns must be finite"),
     (lambda r: r.slice("t", "x", False, 1, CAT_BUSY), TypeError, r"start_ns must be a real number.*bool")],
    ids=["reversed", "track-int", "name-none", "cat-int", "args-list", "start-str", "t-inf", "end-nan", "end-inf",
         "start-bool"])
def test_recorder_refuses_bad_events(call, exc, match):
    """A bad event raises and records nothing, not even its track."""
    r = Recorder()
    with pytest.raises(exc, match=match):
        call(r)
    assert r.tracks == () and len(r) == 0


def test_recorder_span_and_counts_include_instants():
    """An instant after every slice ends the span; ``n_instants(track)`` counts the track's
    instants, not its slices."""
    r = Recorder()
    r.slice("vcpu0", "fault", 10, 20, CAT_BUSY)
    r.slice("vcpu0", "fault", 30, 40, CAT_BUSY)
    r.instant("vcpu0", "race", 55, "race")
    r.instant("vmm", "start", 5, "misc")
    assert r.span() == (5, 55)
    assert (r.n_slices("vcpu0"), r.n_instants("vcpu0"), r.n_instants("vmm"), r.n_instants("nope")) == (2, 1, 1, 0)


# ------------------------------------------------------------------ Chrome trace


def _nested_recorder():
    """vcpu0: a busy slice with a lock wait then a lock hold inside; vcpu1 and vmm too."""
    r = Recorder()
    r.slice("vcpu0", "fault x512", 1_000, 9_000, CAT_BUSY, {"pages": 512})
    r.slice("vcpu0", "hold mmu_lock", 4_000, 9_000, CAT_LOCK_HOLD)  # recorded out of order
    r.slice("vcpu0", "wait mmu_lock", 1_000, 4_000, CAT_LOCK_WAIT)
    r.slice("vcpu1", "tlb flush", 2_500, 3_250, CAT_IPI_STALL)
    r.slice("vmm", "set_memory_attributes", 0, 1_000_123, CAT_BUSY, {"policy": "eager-post"})
    r.instant("vcpu1", "rmp_npf_loop", 3_001, "race", {"gfn": "0x1200"})
    return r


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_chrome_trace_round_trip_and_schema(tmp_path):
    """The file parses; every event has the fields its phase needs, in µs floats."""
    path = tmp_path / "t.json"
    write_chrome_trace(_nested_recorder(), path, metadata={"seed": 3, "policy": "eager-post"})
    doc = _load(path)
    assert list(doc) == ["traceEvents", "displayTimeUnit", "otherData"]
    assert doc["displayTimeUnit"] == "ns"
    assert doc["otherData"] == {"seed": 3, "policy": "eager-post"}
    events = doc["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    names = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert names == {1: "vcpu0", 2: "vcpu1", 3: "vmm"}
    order = {e["tid"]: e["args"]["sort_index"] for e in meta if e["name"] == "thread_sort_index"}
    assert order == {1: 0, 2: 1, 3: 2}
    assert {e["pid"] for e in events} == {1}
    for e in events:
        assert {"name", "ph", "pid", "tid"} <= set(e)
        if e["ph"] == "X":
            assert {"ts", "dur", "cat"} <= set(e)
            assert isinstance(e["ts"], float) and isinstance(e["dur"], float)
        elif e["ph"] == "i":
            assert e["s"] == "t" and isinstance(e["ts"], float) and "cat" in e
    x = {e["name"]: e for e in events if e["ph"] == "X"}
    assert x["set_memory_attributes"]["ts"] == 0.0
    assert x["set_memory_attributes"]["dur"] == 1000.123
    assert x["set_memory_attributes"]["args"] == {"policy": "eager-post"}
    assert x["tlb flush"]["tid"] == 2 and x["tlb flush"]["cat"] == CAT_IPI_STALL
    assert "args" not in x["tlb flush"]
    inst = [e for e in events if e["ph"] == "i"]
    assert inst == [{"name": "rmp_npf_loop", "cat": "race", "ph": "i", "s": "t", "ts": 3.001,
                     "pid": 1, "tid": 2, "args": {"gfn": "0x1200"}}]
    assert len([e for e in events if e["ph"] == "X"]) == 5


def test_chrome_trace_nested_slices_stay_nested(tmp_path):
    """On one track, slices are disjoint or contain one another, enclosing slices first."""
    path = tmp_path / "t.json"
    write_chrome_trace(_nested_recorder(), path)
    events = [e for e in _load(path)["traceEvents"] if e["ph"] == "X" and e["tid"] == 1]
    assert [e["name"] for e in events] == ["fault x512", "wait mmu_lock", "hold mmu_lock"]
    iv = [(round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)) for e in events]
    assert iv == [(1_000, 9_000), (1_000, 4_000), (4_000, 9_000)]
    parent = iv[0]
    for s, e in iv[1:]:
        assert parent[0] <= s and e <= parent[1]
    assert iv[1][1] <= iv[2][0]


def test_chrome_trace_of_a_lock_timeline_nests(tmp_path):
    """Waits and holds recorded by an RWLock nest inside the actors' busy slices."""
    env = simpy.Environment()
    rec = Recorder()
    rw = RWLock(env, "mmu_lock", recorder=rec)

    def actor(owner, start, mode, hold):
        yield env.timeout(start)
        t0 = env.now
        yield (rw.acquire_read if mode == "r" else rw.acquire_write)(owner)
        yield env.timeout(hold)
        (rw.release_read if mode == "r" else rw.release_write)(owner)
        rec.slice(owner, "op", t0, env.now, CAT_BUSY)

    for args in [("vmm", 0, "w", 7_000), ("vcpu0", 1_000, "r", 2_000), ("vcpu1", 2_000, "r", 500)]:
        env.process(actor(*args))
    env.run()
    path = tmp_path / "t.json"
    write_chrome_trace(rec, path)
    events = _load(path)["traceEvents"]
    tids = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    vcpu0 = [(e["name"], e["ts"], e["dur"]) for e in events
             if e["ph"] == "X" and e["tid"] == tids["vcpu0"]]
    assert vcpu0 == [("op", 1.0, 8.0), ("wait mmu_lock", 1.0, 6.0), ("hold mmu_lock", 7.0, 2.0)]


def test_chrome_trace_is_deterministic(tmp_path):
    """The same recorder and metadata give the same bytes, to a path or a file object."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_chrome_trace(_nested_recorder(), a, metadata={"seed": 1})
    write_chrome_trace(_nested_recorder(), b, metadata={"seed": 1})
    assert a.read_bytes() == b.read_bytes()
    text, binary = io.StringIO(), io.BytesIO()
    write_chrome_trace(_nested_recorder(), text, metadata={"seed": 1})
    write_chrome_trace(_nested_recorder(), binary, metadata={"seed": 1})
    assert text.getvalue().encode() == binary.getvalue() == a.read_bytes()
    assert not binary.closed  # the caller's file stays open


def test_chrome_trace_to_a_missing_directory_writes_nothing(tmp_path):
    """A path in a missing directory raises FileNotFoundError naming the directory."""
    missing = tmp_path / "nope" / "t.json"
    with pytest.raises(FileNotFoundError, match=r"directory '.*nope' does not exist"):
        write_chrome_trace(_nested_recorder(), missing)
    assert not (tmp_path / "nope").exists()


def test_chrome_trace_failure_keeps_the_old_file(tmp_path):
    """Unserializable args abort the write: the previous file stays, no temporary is left."""
    path = tmp_path / "t.json"
    write_chrome_trace(_nested_recorder(), path)
    before = path.read_bytes()
    bad = _nested_recorder()
    bad.slice("vcpu9", "x", 0, 1, CAT_BUSY, {"obj": object()})
    with pytest.raises(TypeError, match=r"not JSON serializable"):
        write_chrome_trace(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.json"]
    with pytest.raises(ValueError, match=r"Out of range float values are not JSON compliant"):
        write_chrome_trace(_nested_recorder(), path, metadata={"x": float("nan")})
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"recorder": [], "path_or_file": "x.json"}, r"recorder must be a pkvm.sim.recorder.Recorder"),
     ({"path_or_file": 3}, r"path_or_file must be a path or a file object, got int"),
     ({"path_or_file": "x.json", "metadata": [1]}, r"metadata must be a dict or None, got list")],
    ids=["recorder", "target", "metadata"])
def test_chrome_trace_bad_arguments(tmp_path, kwargs, match):
    """Wrong argument types raise TypeError before anything is written."""
    kwargs = {"recorder": Recorder(), **kwargs}
    if isinstance(kwargs["path_or_file"], str):
        kwargs["path_or_file"] = tmp_path / kwargs["path_or_file"]
    with pytest.raises(TypeError, match=match):
        write_chrome_trace(**kwargs)
    assert os.listdir(tmp_path) == []


def test_empty_recorder_is_a_valid_trace():
    """No tracks: a trace with only the process name."""
    out = io.StringIO()
    write_chrome_trace(Recorder(), out)
    doc = json.loads(out.getvalue())
    assert doc["traceEvents"] == [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0,
                                   "args": {"name": "pkvm"}}]
    assert doc["otherData"] == {}


def test_chrome_trace_writes_instants_by_time():
    """A track's instants are written by time, whatever order they were recorded in."""
    r = Recorder()
    r.instant("vcpu0", "late", 3_000, "race")
    r.instant("vcpu0", "early", 1_000, "race")
    r.instant("vcpu0", "middle", 2_000, "race")
    out = io.StringIO()
    write_chrome_trace(r, out)
    events = [e for e in json.loads(out.getvalue())["traceEvents"] if e["ph"] == "i"]
    assert [(e["name"], e["ts"]) for e in events] == [("early", 1.0), ("middle", 2.0), ("late", 3.0)]


# ------------------------------------------------------------------ Gantt chart


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), min_size=1, max_size=40),
       st.integers(1, 30))
def test_merge_spans_covers_and_separates(raw, gap):
    """Merged spans cover every interval, are sorted, at least ``gap`` wide and apart."""
    intervals = np.array([(s, s + w) for s, w in raw], dtype=np.float64)
    spans = _merge_spans(intervals, float(gap))
    assert all(w >= gap for _, w in spans)
    for (s1, w1), (s2, _) in zip(spans, spans[1:]):
        assert s1 + w1 <= s2  # sorted and disjoint, even after widening to one pixel
        real_end = max(e for s, e in intervals.tolist() if s1 <= s < s2)
        assert s2 >= real_end + gap  # merged whenever the gap was under one pixel
    for s, e in intervals.tolist():
        assert any(a <= s and e <= a + w for a, w in spans)


def test_gantt_writes_a_png(tmp_path):
    """A small recorder renders to a PNG file (checked by its signature)."""
    path = tmp_path / "g.png"
    plot_gantt(_nested_recorder(), path, title="nested")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(tmp_path) == ["g.png"]


def test_gantt_many_slices_and_tracks(tmp_path):
    """Tens of thousands of slices and more tracks than max_tracks still render."""
    r = Recorder()
    rng = np.random.default_rng(1)
    for v in range(80):
        t = 0
        for gap, dur in rng.integers(1, 2_000, size=(250, 2)).tolist():
            r.slice(f"vcpu{v}", "fault", t + gap, t + gap + dur, CAT_BUSY)
            t += gap + dur
    path = tmp_path / "big.png"
    plot_gantt(r, path, max_tracks=16)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_gantt_draws_the_vmm_and_64_vcpus_by_default(tmp_path, monkeypatch):
    """A 64-vCPU run has 65 tracks (the VMM's too): all of them are drawn by default, with
    labels of a readable size (the default of 64 tracks left out the last vCPU, and the labels
    were 5 pt)."""
    from matplotlib.figure import Figure

    figs = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    r = Recorder()
    for i, track in enumerate(["vmm"] + [f"vcpu{v}" for v in range(64)]):
        r.slice(track, "fault", i, i + 10, CAT_BUSY)
    plot_gantt(r, tmp_path / "g.png", title="t")
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 65 and labels[0] == "vcpu63" and labels[-1] == "vmm"
    assert "first" not in ax.get_title()
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 8


def test_gantt_empty_recorder_and_bad_arguments(tmp_path):
    """An empty recorder still gives a PNG; bad arguments raise before writing."""
    plot_gantt(Recorder(), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(FileNotFoundError, match=r"directory '.*missing' does not exist"):
        plot_gantt(Recorder(), tmp_path / "missing" / "g.png")
    with pytest.raises(ValueError, match=r"max_tracks must be >= 1, got 0"):
        plot_gantt(Recorder(), tmp_path / "g.png", max_tracks=0)
    with pytest.raises(TypeError, match=r"recorder must be a pkvm.sim.recorder.Recorder"):
        plot_gantt({}, tmp_path / "g.png")
    assert os.listdir(tmp_path) == ["empty.png"]


def test_merge_spans_keeps_a_gap_of_one_pixel_apart():
    """Slices merge when the gap between them is under ``min_gap``; a gap of exactly
    ``min_gap`` keeps them apart (and each is widened to ``min_gap``)."""
    iv = np.array([[0.0, 1.0], [3.0, 4.0]])
    assert _merge_spans(iv, 2.0) == [(0.0, 2.0), (3.0, 2.0)]
    assert _merge_spans(iv, 2.5) == [(0.0, 4.0)]


def test_gantt_time_unit_boundaries():
    """The axis unit is the largest that a span reaches: 1 s of span is in s, 1 ms in ms."""
    assert _time_unit(1e9) == (1e9, "s")
    assert _time_unit(1e9 - 1) == (1e6, "ms")
    assert _time_unit(1e6) == (1e6, "ms")
    assert _time_unit(1e6 - 1) == (1e3, "µs")


def test_gantt_other_categories_take_distinct_palette_colours():
    """Categories the chart does not know get the palette's colours in order, cycling; the
    known ones keep their fixed colours and do not use up the palette."""
    colours: dict[str, str] = {}
    assert _colour(CAT_BUSY, colours) == "#4c72b0"
    got = [_colour(f"c{i}", colours) for i in range(len(_PALETTE) + 1)]
    assert got[:-1] == _PALETTE and got[-1] == _PALETTE[0]
    assert _colour("c1", colours) == _PALETTE[1]  # a category keeps its colour


def _drawn(monkeypatch, recorder, tmp_path, **kw):
    from matplotlib.figure import Figure
    figs = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    plot_gantt(recorder, tmp_path / "g.png", **kw)
    return figs[0].axes[0]


def test_gantt_rows_axis_and_labels(tmp_path, monkeypatch):
    """The first track is the top row, busy slices fill it and other categories are narrower
    bars on it; the axis starts at 0 for a run from 0 and is in µs for a span under 1 ms."""
    r = Recorder()
    r.slice("vmm", "ioctl", 0, 500_000, CAT_BUSY)
    r.slice("vcpu0", "wait", 100_000, 200_000, CAT_LOCK_WAIT)
    ax = _drawn(monkeypatch, r, tmp_path)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["vcpu0", "vmm"]  # bottom to top
    bars = {}
    for c in ax.collections:
        ys = c.get_paths()[0].vertices[:, 1]
        bars[tuple(np.round(c.get_facecolor()[0][:3], 3))] = (round(ys.min(), 2), round(ys.max(), 2))
    from matplotlib.colors import to_rgb
    assert bars[tuple(np.round(to_rgb("#4c72b0"), 3))] == (0.6, 1.4)  # vmm busy: row 1, full height
    assert bars[tuple(np.round(to_rgb("#dd8452"), 3))] == (-0.22, 0.22)  # vcpu0 wait: row 0, narrower
    assert ax.get_xlabel() == "time (µs)"


def test_gantt_axis_starts_at_the_first_event_of_a_late_start(tmp_path, monkeypatch):
    """Events that start late in the run (after 10 % of the span) put the axis origin at the
    first event, and the label says where it is."""
    r = Recorder()
    r.slice("vcpu0", "fault", 5_000_000, 5_500_000, CAT_BUSY)
    ax = _drawn(monkeypatch, r, tmp_path)
    assert ax.get_xlabel() == "time since 5 ms (µs)"
    assert ax.get_xlim()[1] == pytest.approx(500 * 1.01)
    r = Recorder()  # a first event at 10 % of the span still counts as from the start
    r.slice("vcpu0", "fault", 100_000, 1_100_000, CAT_BUSY)
    assert _drawn(monkeypatch, r, tmp_path).get_xlabel() == "time (ms)"


def test_gantt_max_tracks_draws_that_many(tmp_path, monkeypatch):
    """``max_tracks`` tracks are drawn, the first ones, and the title says how many of all."""
    r = Recorder()
    for t in ("vmm", "vcpu0", "vcpu1"):
        r.slice(t, "x", 0, 10, CAT_BUSY)
    ax = _drawn(monkeypatch, r, tmp_path, max_tracks=2, title="run")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["vcpu0", "vmm"]
    assert ax.get_title() == "run  (first 2 of 3 tracks)"


@pytest.mark.parametrize(("platform", "policy", "workload"), [("tdx", "6.19", "mixed"), ("snp", "eager-post", "mixed")])
def test_a_run_s_wait_and_hold_slices_add_up_to_its_locks(tmp_path, platform, policy, workload):
    """In a run's Chrome trace (``Config.timeline``) each lock's ``wait`` slices add up to the
    lock's ``wait_ns`` and its ``hold`` slices to its holds (``mmu_lock``: the read ones to
    ``hold_read_ns``, the write ones to ``hold_write_ns``). (A payment of waits owed for
    several locks was one slice named after the last lock: in TDX ``mixed`` at 256 MiB with 3
    vCPUs, 0.2 ms of the S-EPT's waits showed as ``mmu_lock``'s.)"""
    from pkvm import experiments as E

    path = tmp_path / "t.json"
    r = E.run(E.Config(platform=platform, policy=policy, workload=workload, memory="256M", vcpus=3,
                       timeline=str(path)), seed=1)
    waits: dict[str, float] = {}
    holds: dict[str, float] = {}
    for e in _load(path)["traceEvents"]:
        if e.get("ph") == "X" and e["name"].startswith(("wait ", "hold ")):
            kind, lock = e["name"].split(" ", 1)
            d = waits if kind == "wait" else holds
            d[lock] = d.get(lock, 0.0) + e["dur"] * 1000  # µs -> ns
    assert waits
    for lock, st in r.locks.items():
        assert waits.get(lock, 0.0) == pytest.approx(st.get("wait_ns", 0), abs=1), lock
        if lock == "mmu_lock":
            assert holds.get("mmu_lock (read)", 0.0) == pytest.approx(st["hold_read_ns"], abs=1)
            assert holds.get("mmu_lock", 0.0) == pytest.approx(st["hold_write_ns"], abs=1)
        else:
            assert holds.get(lock, 0.0) == pytest.approx(st.get("hold_ns", 0), abs=1), lock
