// The native reference for RangeMap's workloads: absl::btree_map used as a run map.
//
// Built and run by bench/native_report.py (a benchmark-only reference, not a dependency of
// pkvm; see docs/performance.md). It reads the W2/W3 operation sequences that
// bench/rangemap_workloads.py generates from its fixed seed (a binary file: the magic
// "PKVMRMW1", two uint64 counts n2 and n3, then the uint64 arrays w2_keys, w2_values,
// w2_lookups [n2 each] and w3 assign starts, ends, values, query starts, ends, values
// [n3 each]), runs every workload `rounds` times on fresh state with no Python in the loop,
// and prints one JSON object: the median nanoseconds per operation of each workload, the
// results the Python side checks against its models, and the RSS growth of the post-W2 map.
//
// The map holds what RangeMap holds: the maximal runs [start, end) whose value differs from
// the default (0), keyed by start, coalesced, with the same assign / get / find_ne semantics.

#include <absl/container/btree_map.h>

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Span {
  uint64_t end;
  uint64_t value;
};

using Map = absl::btree_map<uint64_t, Span>;
constexpr uint64_t kDefault = 0;

// Set every key of [s, e) to v: erase the runs the range touches or overlaps, keep the parts
// outside it, and merge with equal-valued neighbours.
void Assign(Map& m, uint64_t s, uint64_t e, uint64_t v) {
  if (s >= e) return;
  auto it = m.upper_bound(s);
  if (it != m.begin()) {
    auto p = std::prev(it);
    if (p->second.end >= s) it = p;
  }
  // Nothing to do when one stored run already covers [s, e) with v.
  if (it != m.end() && it->first <= s && it->second.end >= e && it->second.value == v) return;
  uint64_t new_s = s, new_e = e;
  bool have_right = false;
  uint64_t right_end = 0, right_value = 0;
  while (it != m.end() && it->first <= e) {
    const uint64_t rs = it->first, re = it->second.end, rv = it->second.value;
    if (rs == e) {  // touches on the right
      if (rv == v) {
        new_e = re;
        it = m.erase(it);
      }
      break;
    }
    if (re == s) {  // touches on the left
      if (rv == v) {
        new_s = rs;
        it = m.erase(it);
      } else {
        ++it;
      }
      continue;
    }
    if (re > e) {
      if (rv == v) {
        new_e = re;
      } else {
        have_right = true;
        right_end = re;
        right_value = rv;
      }
    }
    if (rs < s) {
      if (rv == v) {
        new_s = rs;
        it = m.erase(it);
      } else {
        it->second.end = s;  // keep the head in place
        ++it;
      }
    } else {
      it = m.erase(it);
    }
  }
  if (v != kDefault) it = std::next(m.insert(it, {new_s, Span{new_e, v}}));
  if (have_right) m.insert(it, {e, Span{right_end, right_value}});
}

uint64_t Get(const Map& m, uint64_t k) {
  auto it = m.upper_bound(k);
  if (it == m.begin()) return kDefault;
  --it;
  return k < it->second.end ? it->second.value : kDefault;
}

// The first key of [s, e) whose value is not v, or -1 (as uint64_t) if there is none.
uint64_t FindNe(const Map& m, uint64_t s, uint64_t e, uint64_t v) {
  if (s >= e) return UINT64_MAX;
  auto it = m.upper_bound(s);
  const bool in_prev = it != m.begin() && std::prev(it)->second.end > s;
  if (v == kDefault) {
    if (in_prev) return s;
    if (it != m.end() && it->first < e) return it->first;
    return UINT64_MAX;
  }
  if (!in_prev) return s;
  auto p = std::prev(it);
  if (p->second.value != v) return s;
  return p->second.end >= e ? UINT64_MAX : p->second.end;
}

// The stable ascending order of keys: an LSD radix sort with 8-bit digits that skips the
// digits no key uses (what RangeMap's bulk calls do). order receives the permutation and
// sorted the keys in that order.
void RadixOrder(const std::vector<uint64_t>& keys, std::vector<uint32_t>& order,
                std::vector<uint64_t>& sorted) {
  const size_t n = keys.size();
  uint64_t bits = 0;
  for (uint64_t k : keys) bits |= k;
  int passes = 0;
  while (passes < 8 && (bits >> (8 * passes)) != 0) ++passes;
  std::vector<size_t> cnt(256 * 8, 0);
  sorted.assign(keys.begin(), keys.end());
  order.resize(n);
  for (size_t i = 0; i < n; ++i) {
    order[i] = static_cast<uint32_t>(i);
    for (int p = 0; p < passes; ++p) ++cnt[p * 256 + ((keys[i] >> (8 * p)) & 255)];
  }
  std::vector<uint64_t> k2(n);
  std::vector<uint32_t> o2(n);
  for (int p = 0; p < passes; ++p) {
    size_t* c = &cnt[p * 256];
    size_t total = 0;
    for (int d = 0; d < 256; ++d) {
      size_t x = c[d];
      c[d] = total;
      total += x;
    }
    for (size_t i = 0; i < n; ++i) {
      size_t at = c[(sorted[i] >> (8 * p)) & 255]++;
      k2[at] = sorted[i];
      o2[at] = order[i];
    }
    sorted.swap(k2);
    order.swap(o2);
  }
}

// assign(S[i], S[i] + 1, V[i]) for every i, the native bulk way: radix-sort the keys, then
// merge the stored runs with the one-key ranges in key order (of equal keys the last in array
// order wins) into a new map built by appending at its end, and swap it in.
void ToggleMany(Map& m, const std::vector<uint64_t>& keys, const std::vector<uint64_t>& values) {
  std::vector<uint32_t> order;
  std::vector<uint64_t> sorted;
  RadixOrder(keys, order, sorted);
  Map out;
  bool have = false;
  uint64_t ps = 0, pe = 0, pv = 0;  // the pending run, kept back so the next can coalesce
  auto emit = [&](uint64_t s, uint64_t e, uint64_t v) {
    if (s >= e || v == kDefault) return;
    if (have && pe == s && pv == v) {
      pe = e;
      return;
    }
    if (have) out.emplace_hint(out.end(), ps, Span{pe, pv});
    ps = s, pe = e, pv = v, have = true;
  };
  auto it = m.begin();
  bool cur = it != m.end();
  uint64_t cs = cur ? it->first : 0, ce = cur ? it->second.end : 0, cv = cur ? it->second.value : 0;
  auto next = [&]() {
    ++it;
    cur = it != m.end();
    if (cur) cs = it->first, ce = it->second.end, cv = it->second.value;
  };
  const size_t n = keys.size();
  for (size_t j = 0; j < n; ++j) {
    const uint64_t s = sorted[j], e = s + 1;
    if (j + 1 < n && sorted[j + 1] == s) continue;  // a later toggle of the same key wins
    const uint64_t v = values[order[j]];
    while (cur && cs < s) {
      emit(cs, ce < s ? ce : s, cv);
      if (ce > s) {
        cs = s;
        break;
      }
      next();
    }
    while (cur && cs < e) {
      if (ce > e) {
        cs = e;
        break;
      }
      next();
    }
    emit(s, e, v);
  }
  while (cur) {
    emit(cs, ce, cv);
    next();
  }
  if (have) out.emplace_hint(out.end(), ps, Span{pe, pv});
  m.swap(out);
}

// out[i] = get(keys[i]) for every i, the native bulk way: radix-sort the keys, walk the runs
// with a finger iterator in key order, scatter the answers back.
void GetMany(const Map& m, const std::vector<uint64_t>& keys, std::vector<uint64_t>& out) {
  std::vector<uint32_t> order;
  std::vector<uint64_t> sorted;
  RadixOrder(keys, order, sorted);
  out.resize(keys.size());
  auto it = m.end();  // the finger: the last run starting at or before the last key
  for (size_t j = 0; j < sorted.size(); ++j) {
    const uint64_t k = sorted[j];
    // Step the finger forward (at most 8 runs) while the next run starts at or before k;
    // otherwise descend from the root.
    bool found = false;
    if (it != m.end() && it->first <= k) {
      for (int steps = 0; steps < 8; ++steps) {
        auto nx = std::next(it);
        if (nx == m.end() || nx->first > k) {
          found = true;
          break;
        }
        it = nx;
      }
    }
    if (!found) {
      it = m.upper_bound(k);
      if (it == m.begin()) {
        it = m.end();
        out[order[j]] = kDefault;
        continue;
      }
      --it;
    }
    out[order[j]] = k < it->second.end ? it->second.value : kDefault;
  }
}

long RssBytes() {
  long size = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return -1;
  if (std::fscanf(f, "%ld %ld", &size, &resident) != 2) resident = -1;
  std::fclose(f);
  return resident * sysconf(_SC_PAGESIZE);
}

// CPU time of this thread: on a shared machine, time spent descheduled is not the map's.
double Now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double Median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Input {
  std::vector<uint64_t> w2_keys, w2_values, w2_lookups;
  std::vector<uint64_t> a_s, a_e, a_v, q_s, q_e, q_v;
};

bool ReadArray(FILE* f, std::vector<uint64_t>& out, uint64_t n) {
  out.resize(n);
  return std::fread(out.data(), sizeof(uint64_t), n, f) == n;
}

bool ReadInput(const char* path, Input& in) {
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return false;
  char magic[8];
  uint64_t n[2];
  bool ok = std::fread(magic, 1, 8, f) == 8 && std::memcmp(magic, "PKVMRMW1", 8) == 0 &&
            std::fread(n, sizeof(uint64_t), 2, f) == 2 && ReadArray(f, in.w2_keys, n[0]) &&
            ReadArray(f, in.w2_values, n[0]) && ReadArray(f, in.w2_lookups, n[0]) &&
            ReadArray(f, in.a_s, n[1]) && ReadArray(f, in.a_e, n[1]) &&
            ReadArray(f, in.a_v, n[1]) && ReadArray(f, in.q_s, n[1]) &&
            ReadArray(f, in.q_e, n[1]) && ReadArray(f, in.q_v, n[1]);
  std::fclose(f);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s WORKLOADS.bin ROUNDS\n", argv[0]);
    return 2;
  }
  Input in;
  if (!ReadInput(argv[1], in)) {
    std::fprintf(stderr, "absl_btree: cannot read workloads from %s\n", argv[1]);
    return 2;
  }
  const int rounds = std::atoi(argv[2]);
  if (rounds < 1) {
    std::fprintf(stderr, "absl_btree: ROUNDS must be a positive integer, not %s\n", argv[2]);
    return 2;
  }
  const size_t n2 = in.w2_keys.size(), n3 = in.a_s.size();

  // RSS growth of the post-W2 map (per-op toggles from empty), before any timed work.
  long rss_before = RssBytes();
  Map* w2 = new Map;
  for (size_t i = 0; i < n2; ++i) Assign(*w2, in.w2_keys[i], in.w2_keys[i] + 1, in.w2_values[i]);
  long rss_growth = RssBytes() - rss_before;
  const size_t w2_runs = w2->size();

  std::vector<double> t_toggle, t_lookup, t_w3, t_btoggle, t_blookup;
  size_t hits = 0, bulk_hits = 0, uniform = 0, w3_runs = 0, bulk_runs = 0;
  for (int r = 0; r < rounds; ++r) {
    {  // W2 toggle: per-op assigns in array order
      Map m;
      double t0 = Now();
      for (size_t i = 0; i < n2; ++i) Assign(m, in.w2_keys[i], in.w2_keys[i] + 1, in.w2_values[i]);
      t_toggle.push_back(Now() - t0);
    }
    {  // W2 lookup: per-op gets on the post-W2 state
      double t0 = Now();
      size_t h = 0;
      for (size_t i = 0; i < n2; ++i) h += Get(*w2, in.w2_lookups[i]) != kDefault;
      t_lookup.push_back(Now() - t0);
      hits = h;
    }
    {  // W3: assign a range, then ask whether another range is uniform
      Map m;
      double t0 = Now();
      size_t u = 0;
      for (size_t i = 0; i < n3; ++i) {
        Assign(m, in.a_s[i], in.a_e[i], in.a_v[i]);
        u += FindNe(m, in.q_s[i], in.q_e[i], in.q_v[i]) == UINT64_MAX;
      }
      t_w3.push_back(Now() - t0);
      uniform = u;
      w3_runs = m.size();
    }
    {  // W4 toggle: assign_many's job done natively (radix sort, merge, rebuild)
      Map m;
      double t0 = Now();
      ToggleMany(m, in.w2_keys, in.w2_values);
      t_btoggle.push_back(Now() - t0);
      bulk_runs = m.size();
    }
    {  // W4 lookup: get_many's job done natively (radix sort, finger walk, scatter)
      std::vector<uint64_t> out;
      double t0 = Now();
      GetMany(*w2, in.w2_lookups, out);
      t_blookup.push_back(Now() - t0);
      size_t h = 0;
      for (uint64_t x : out) h += x != kDefault;
      bulk_hits = h;
    }
  }
  delete w2;
  std::printf(
      "{\"rounds\": %d, \"w2_ops\": %zu, \"w3_ops\": %zu, "
      "\"ns\": {\"W2-toggle\": %.2f, \"W2-lookup\": %.2f, \"W3\": %.2f, "
      "\"W4-toggle\": %.2f, \"W4-lookup\": %.2f}, "
      "\"w2_runs\": %zu, \"w2_hits\": %zu, \"w3_uniform\": %zu, \"w3_runs\": %zu, "
      "\"w4_runs\": %zu, \"w4_hits\": %zu, \"w2_rss_growth\": %ld}\n",
      rounds, n2, n3, Median(t_toggle) / n2 * 1e9, Median(t_lookup) / n2 * 1e9,
      Median(t_w3) / n3 * 1e9, Median(t_btoggle) / n2 * 1e9, Median(t_blookup) / n2 * 1e9,
      w2_runs, hits, uniform, w3_runs, bulk_runs, bulk_hits, rss_growth);
  return 0;
}
