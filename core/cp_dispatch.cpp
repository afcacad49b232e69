#include "core/cp_dispatch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <sstream>

#include "core/errors.h"

namespace flexcp {

namespace {

// One query row's visible keys in some key coordinate, for the slice builder.
struct RowKeys {
  int64_t row;  // local query row
  int64_t lo, hi;
};

// Turns rows (ascending, each with a non-empty key interval) into slices that cover exactly those
// cells. A run of consecutive rows whose interval ends each move by a fixed 0 or 1 per row is one
// slice: both ends fixed = FULL, end moving = CAUSAL (bottom-right aligned), start moving =
// INV_CAUSAL, both moving = BI_CAUSAL (the spec doc's table, read backwards).
void rows_to_slices(const std::vector<RowKeys>& rows, std::vector<AttnSlice>& out) {
  size_t p = 0;
  while (p < rows.size()) {
    size_t q = p + 1;
    int64_t dlo = -1, dhi = -1;
    while (q < rows.size() && rows[q].row == rows[q - 1].row + 1) {
      const int64_t a = rows[q].lo - rows[q - 1].lo, b = rows[q].hi - rows[q - 1].hi;
      if (a < 0 || a > 1 || b < 0 || b > 1) break;
      if (dlo >= 0 && (a != dlo || b != dhi)) break;
      dlo = a;
      dhi = b;
      ++q;
    }
    const RowKeys& f = rows[p];
    const RowKeys& l = rows[q - 1];
    AttnSlice s;
    s.q = {f.row, l.row + 1};
    if (dlo <= 0 && dhi <= 0) {
      s.k = {f.lo, f.hi};
      s.mask = MaskType::Full;
    } else if (dlo == 0) {
      s.k = {f.lo, l.hi};
      s.mask = MaskType::Causal;
    } else if (dhi == 0) {
      s.k = {f.lo, f.hi};
      s.mask = MaskType::InvCausal;
    } else {
      s.k = {f.lo, l.hi};
      s.mask = MaskType::BiCausal;
    }
    out.push_back(s);
    p = q;
  }
}

// Sorted, merged union of intervals.
std::vector<Range> merge_ranges(std::vector<Range> v) {
  std::sort(v.begin(), v.end(), [](const Range& a, const Range& b) { return a.start < b.start; });
  std::vector<Range> out;
  for (const auto& r : v) {
    if (r.empty()) continue;
    if (!out.empty() && r.start <= out.back().end)
      out.back().end = std::max(out.back().end, r.end);
    else
      out.push_back(r);
  }
  return out;
}

std::string spec_key(const AttentionSpec& s) {
  std::string key(sizeof(int64_t) * 2 + s.slices.size() * sizeof(AttnSlice), '\0');
  char* p = key.data();
  std::memcpy(p, &s.num_q, sizeof(int64_t));
  std::memcpy(p + sizeof(int64_t), &s.num_k, sizeof(int64_t));
  p += 2 * sizeof(int64_t);
  for (const auto& sl : s.slices) {
    AttnSlice c{};  // copy field by field: padding bytes must not enter the key
    std::memset(static_cast<void*>(&c), 0, sizeof c);
    c.q = sl.q;
    c.k = sl.k;
    c.mask = sl.mask;
    std::memcpy(p, &c, sizeof c);
    p += sizeof c;
  }
  return key;
}

}  // namespace

double CpPlan::imbalance() const {
  if (ranks.empty() || spec_area <= 0) return 1.0;
  int64_t mx = 0;
  for (const auto& r : ranks) mx = std::max(mx, r.area);
  return static_cast<double>(mx) * static_cast<double>(cp) / static_cast<double>(spec_area);
}

int64_t cp_chunk_size_default(int64_t num_tokens, int64_t cp) {
  if (cp < 1) fail("parallel.cp", "must be at least 1, got " + std::to_string(cp));
  if (num_tokens % cp != 0)
    fail("context parallelism",
         std::to_string(num_tokens) + " tokens per micro-batch do not split into cp=" + std::to_string(cp) +
             " equal parts",
         "choose train.seq_len as a multiple of parallel.cp");
  int64_t c = (num_tokens + 8 * cp - 1) / (8 * cp);
  while (c > 1 && num_tokens % (cp * c) != 0) --c;
  return std::max<int64_t>(c, 1);
}

std::vector<int64_t> cp_chunk_areas(const AttentionSpec& spec, int64_t chunk_size) {
  const int64_t n = (spec.num_q + chunk_size - 1) / chunk_size;
  std::vector<int64_t> area(static_cast<size_t>(n), 0);
  for (const auto& s : spec.slices) {
    if (s.q.empty() || s.k.empty()) continue;
    for (int64_t c = s.q.start / chunk_size; c * chunk_size < s.q.end; ++c)
      area[static_cast<size_t>(c)] += slice_area_rows(s, c * chunk_size, (c + 1) * chunk_size);
  }
  return area;
}

std::vector<int> cp_assign_chunks(const std::vector<int64_t>& work, int64_t cp) {
  const int64_t n = static_cast<int64_t>(work.size());
  if (cp < 1 || n % cp != 0) fail("context parallelism", "chunk count " + std::to_string(n) + " is not a multiple of cp=" + std::to_string(cp));
  const int64_t cap = n / cp;
  std::vector<int> owner(static_cast<size_t>(n), -1);
  std::vector<int64_t> load(static_cast<size_t>(cp), 0), count(static_cast<size_t>(cp), 0);
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  for (int64_t c : order) {
    int best = -1;
    for (int r = 0; r < cp; ++r)
      if (count[r] < cap && (best < 0 || load[r] < load[best])) best = r;
    owner[c] = best;
    load[best] += work[c];
    ++count[best];
  }
  // Refinement: swap a chunk of the most-loaded rank A with a lighter chunk of rank B when both new
  // loads stay below A's. Each swap strictly lowers the sum of squared loads, so this ends.
  std::vector<std::vector<int64_t>> chunks(static_cast<size_t>(cp));
  for (int64_t c = 0; c < n; ++c) chunks[owner[c]].push_back(c);
  for (int64_t iter = 0; iter < 20 * n; ++iter) {
    int a = 0;
    for (int r = 1; r < cp; ++r)
      if (load[r] > load[a]) a = r;
    int64_t best_max = load[a];
    int best_b = -1;
    size_t best_i = 0, best_j = 0;
    for (size_t i = 0; i < chunks[a].size(); ++i) {
      const int64_t wa = work[chunks[a][i]];
      for (int b = 0; b < cp; ++b) {
        if (b == a) continue;
        for (size_t j = 0; j < chunks[b].size(); ++j) {
          const int64_t wb = work[chunks[b][j]];
          if (wb >= wa) continue;
          const int64_t m = std::max(load[a] - wa + wb, load[b] - wb + wa);
          if (m < best_max) {
            best_max = m;
            best_b = b;
            best_i = i;
            best_j = j;
          }
        }
      }
    }
    if (best_b < 0) break;
    const int64_t ca = chunks[a][best_i], cb = chunks[best_b][best_j];
    load[a] += work[cb] - work[ca];
    load[best_b] += work[ca] - work[cb];
    chunks[a][best_i] = cb;
    chunks[best_b][best_j] = ca;
    owner[ca] = best_b;
    owner[cb] = a;
  }
  return owner;
}

CpPlan cp_plan_build(const AttentionSpec& global, const CpDispatchOptions& opts) {
  if (global.num_q != global.num_k)
    fail("context parallelism", "the spec must be self-attention over one token axis (num_q " +
                                    std::to_string(global.num_q) + " != num_k " + std::to_string(global.num_k) + ")");
  CpPlan plan;
  plan.cp = opts.cp;
  plan.num_tokens = global.num_q;
  const int64_t cp = opts.cp, T = global.num_q;
  plan.chunk_size = opts.chunk_size > 0 ? opts.chunk_size : cp_chunk_size_default(T, cp);
  const int64_t C = plan.chunk_size;
  if (T % (cp * C) != 0)
    fail("context parallelism",
         std::to_string(T) + " tokens per micro-batch do not divide into cp=" + std::to_string(cp) + " x chunks of " +
             std::to_string(C) + " tokens",
         "set parallel.cp_chunk_size so that cp * cp_chunk_size divides train.seq_len (0 picks one)");
  plan.num_chunks = T / C;
  plan.chunk_area = cp_chunk_areas(global, C);
  plan.chunk_owner = cp_assign_chunks(plan.chunk_area, cp);
  plan.spec_area = std::accumulate(plan.chunk_area.begin(), plan.chunk_area.end(), int64_t{0});

  // Chunk -> position among its owner's chunks, so global token -> (owner, local row) is O(1).
  std::vector<int64_t> chunk_pos(static_cast<size_t>(plan.num_chunks));
  std::vector<int64_t> seen(static_cast<size_t>(cp), 0);
  for (int64_t c = 0; c < plan.num_chunks; ++c) chunk_pos[c] = seen[plan.chunk_owner[c]]++;
  auto local_of = [&](int64_t g) { return chunk_pos[g / C] * C + g % C; };
  auto owner_of = [&](int64_t g) { return plan.chunk_owner[g / C]; };

  // Slices sorted by q start let each rank visit only the slices its rows touch.
  std::vector<AttnSlice> slices;
  for (const auto& s : global.slices)
    if (!s.q.empty() && !s.k.empty()) slices.push_back(s);
  std::sort(slices.begin(), slices.end(), [](const AttnSlice& a, const AttnSlice& b) { return a.q.start < b.q.start; });

  plan.ranks.resize(static_cast<size_t>(cp));
  // Phase A: every rank's tokens and the remote ranges it needs.
  for (int r = 0; r < cp; ++r) {
    CpRankPlan& rp = plan.ranks[r];
    rp.rank = r;
    rp.num_local = T / cp;
    for (int64_t c = 0; c < plan.num_chunks; ++c) {
      if (plan.chunk_owner[c] != r) continue;
      rp.area += plan.chunk_area[c];
      for (int64_t g = c * C; g < (c + 1) * C; ++g) rp.local_to_global.push_back(g);
      if (!rp.owned.empty() && rp.owned.back().end == c * C)
        rp.owned.back().end += C;
      else
        rp.owned.push_back({c * C, (c + 1) * C});
    }
    std::vector<Range> need;
    for (const auto& s : slices) {
      for (const auto& run : rp.owned) {
        const int64_t r0 = std::max(run.start, s.q.start), r1 = std::min(run.end, s.q.end);
        Range cur{0, 0};
        for (int64_t i = r0; i < r1; ++i) {
          const Range k = slice_row_keys(s, i);
          if (k.empty()) continue;
          if (!cur.empty() && k.start <= cur.end && k.end >= cur.start) {
            cur.start = std::min(cur.start, k.start);
            cur.end = std::max(cur.end, k.end);
          } else {
            if (!cur.empty()) need.push_back(cur);
            cur = k;
          }
        }
        if (!cur.empty()) need.push_back(cur);
      }
    }
    rp.recv_ranges.assign(static_cast<size_t>(cp), {});
    for (const auto& nr : merge_ranges(std::move(need))) {
      for (int64_t g = nr.start; g < nr.end;) {
        const int64_t piece_end = std::min(nr.end, (g / C + 1) * C);
        const int o = owner_of(g);
        if (o != r) {
          auto& v = rp.recv_ranges[o];
          if (!v.empty() && v.back().end == g)
            v.back().end = piece_end;
          else
            v.push_back({g, piece_end});
        }
        g = piece_end;
      }
    }
  }

  // Phase B: kv buffers, stages, sends and local specs.
  const int64_t R = cp > 1 ? std::clamp<int64_t>(opts.remote_stages > 0 ? opts.remote_stages : 2, 1, cp - 1) : 0;
  auto stage_of_offset = [&](int64_t d) { return 1 + (d - 1) * R / (cp - 1); };  // d in [1, cp-1]
  for (int r = 0; r < cp; ++r) {
    CpRankPlan& rp = plan.ranks[r];
    rp.stages.assign(static_cast<size_t>(R + 1), {});
    for (auto& st : rp.stages) {
      st.send_counts.assign(static_cast<size_t>(cp), 0);
      st.recv_counts.assign(static_cast<size_t>(cp), 0);
    }
    int64_t lrow = 0;
    for (const auto& run : rp.owned) {
      rp.kv_runs.push_back({r, run, lrow, lrow});
      lrow += run.size();
    }
    rp.stages[0].buf = {0, rp.num_local};
    int64_t buf = rp.num_local;
    for (int64_t st = 1; st <= R; ++st) {
      CpStage& S = rp.stages[st];
      S.buf.start = buf;
      for (int src = 0; src < cp; ++src) {
        if (src == r || stage_of_offset(((src - r) % cp + cp) % cp) != st) continue;
        for (const auto& g : rp.recv_ranges[src]) {
          rp.kv_runs.push_back({src, g, local_of(g.start), buf});
          buf += g.size();
          S.recv_counts[src] += g.size();
        }
      }
      S.buf.end = buf;
      for (int dst = 0; dst < cp; ++dst) {
        if (dst == r || stage_of_offset(((r - dst) % cp + cp) % cp) != st) continue;
        for (const auto& g : plan.ranks[dst].recv_ranges[r]) {
          for (int64_t t = g.start; t < g.end; ++t) S.send_index.push_back(local_of(t));
          S.send_counts[dst] += g.size();
        }
      }
    }
    rp.kv_len = buf;

    // Local spec: every (global slice, kv run) pair becomes the slices covering its cells.
    std::vector<KvRun> windows = rp.kv_runs;
    std::sort(windows.begin(), windows.end(), [](const KvRun& a, const KvRun& b) { return a.global.start < b.global.start; });
    std::vector<AttnSlice> out;
    std::vector<RowKeys> rows, part;
    for (const auto& s : slices) {
      rows.clear();
      int64_t lbase = 0;
      for (const auto& run : rp.owned) {
        const int64_t r0 = std::max(run.start, s.q.start), r1 = std::min(run.end, s.q.end);
        for (int64_t i = r0; i < r1; ++i) {
          const Range k = slice_row_keys(s, i);
          if (!k.empty()) rows.push_back({lbase + (i - run.start), k.start, k.end});
        }
        lbase += run.size();
      }
      if (rows.empty()) continue;
      int64_t klo = rows.front().lo, khi = rows.front().hi;
      for (const auto& rk : rows) {
        klo = std::min(klo, rk.lo);
        khi = std::max(khi, rk.hi);
      }
      for (const auto& w : windows) {
        if (w.global.end <= klo || w.global.start >= khi) continue;
        part.clear();
        const int64_t shift = w.buf - w.global.start;
        for (const auto& rk : rows) {
          const int64_t lo = std::max(rk.lo, w.global.start), hi = std::min(rk.hi, w.global.end);
          if (lo < hi) part.push_back({rk.row, lo + shift, hi + shift});
        }
        rows_to_slices(part, out);
      }
    }
    rp.local_spec.num_q = rp.num_local;
    rp.local_spec.num_k = rp.kv_len;
    rp.local_spec.slices = out;
    for (auto& S : rp.stages) {
      S.spec.num_q = rp.num_local;
      S.spec.num_k = S.buf.size();
    }
    for (const auto& sl : out) {
      int64_t st = 0;
      while (st < R && sl.k.start >= rp.stages[st].buf.end) ++st;
      AttnSlice moved = sl;
      moved.k.start -= rp.stages[st].buf.start;
      moved.k.end -= rp.stages[st].buf.start;
      rp.stages[st].spec.slices.push_back(moved);
    }
  }
  return plan;
}

at::Tensor cp_dispatch_rows(const CpPlan& plan, int rank, const at::Tensor& global) {
  TORCH_CHECK(global.size(0) == plan.num_tokens, "cp_dispatch_rows: expected ", plan.num_tokens, " rows, got ",
              global.size(0));
  const auto& l2g = plan.ranks.at(rank).local_to_global;
  at::Tensor idx = at::tensor(l2g, at::TensorOptions().dtype(at::kLong)).to(global.device());
  return global.index_select(0, idx);
}

at::Tensor cp_undispatch_rows(const CpPlan& plan, const std::vector<at::Tensor>& per_rank) {
  TORCH_CHECK(static_cast<int64_t>(per_rank.size()) == plan.cp, "cp_undispatch_rows: one tensor per rank expected");
  auto sizes = per_rank[0].sizes().vec();
  sizes[0] = plan.num_tokens;
  at::Tensor out = at::empty(sizes, per_rank[0].options());
  for (int64_t r = 0; r < plan.cp; ++r) {
    const auto& l2g = plan.ranks[r].local_to_global;
    at::Tensor idx = at::tensor(l2g, at::TensorOptions().dtype(at::kLong)).to(out.device());
    out.index_copy_(0, idx, per_rank[r]);
  }
  return out;
}

int64_t CpCommVolume::total_send() const { return std::accumulate(send_tokens.begin(), send_tokens.end(), int64_t{0}); }

CpCommVolume cp_comm_volume(const CpPlan& plan) {
  CpCommVolume v;
  v.send_tokens.assign(static_cast<size_t>(plan.cp), 0);
  v.recv_tokens.assign(static_cast<size_t>(plan.cp), 0);
  for (const auto& rp : plan.ranks)
    for (const auto& st : rp.stages)
      for (int64_t p = 0; p < plan.cp; ++p) {
        v.send_tokens[rp.rank] += st.send_counts[p];
        v.recv_tokens[rp.rank] += st.recv_counts[p];
      }
  v.ring_send_tokens = (plan.cp - 1) * (plan.num_tokens / plan.cp);
  return v;
}

std::string cp_comm_report(const CpPlan& plan, int64_t kv_heads, int64_t head_dim, int64_t elem_bytes) {
  const CpCommVolume v = cp_comm_volume(plan);
  const double kv_token = 2.0 * static_cast<double>(kv_heads * head_dim * elem_bytes);  // K and V
  const double mib = 1024.0 * 1024.0;
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(3);
  os << "context parallelism: cp=" << plan.cp << ", " << plan.num_tokens << " tokens, chunk " << plan.chunk_size
     << ", area imbalance (max/mean) " << plan.imbalance() << "\n";
  os << "  per layer, forward K/V group-cast (MiB) vs ring attention:\n";
  for (const auto& rp : plan.ranks) {
    os << "  rank " << rp.rank << ": area " << rp.area << ", sent " << v.send_tokens[rp.rank] * kv_token / mib
       << ", received " << v.recv_tokens[rp.rank] * kv_token / mib << ", ring sends "
       << v.ring_send_tokens * kv_token / mib << "\n";
  }
  os << "  total sent " << v.total_send() * kv_token / mib << " MiB vs ring " << v.total_ring() * kv_token / mib
     << " MiB";
  if (v.total_ring() > 0) os << " (" << 100.0 * static_cast<double>(v.total_send()) / static_cast<double>(v.total_ring()) << "%)";
  return os.str();
}

std::shared_ptr<const CpPlan> CpPlanner::plan_for(const AttentionSpec& global) {
  std::string key = spec_key(global);
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].key == key) {
      Entry e = std::move(entries_[i]);
      entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
      entries_.push_back(std::move(e));
      return entries_.back().plan;
    }
  }
  auto plan = std::make_shared<const CpPlan>(cp_plan_build(global, opts_));
  entries_.push_back({std::move(key), plan});
  if (entries_.size() > capacity_) entries_.erase(entries_.begin());
  return plan;
}

}  // namespace flexcp
