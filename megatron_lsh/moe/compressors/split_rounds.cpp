// The split rounds of the target-rate clustering on CPU (pybind11 module
// megatron_lsh.moe.compressors._split).
//
// Same algorithm and contract as clustering._split_rounds_torch (steps 3-5 of the
// clustering module's docstring): each round every expert cuts its largest-error clusters in
// two along their principal axis (power iterations from the farthest row, then 2-means
// steps) until it has its target count. The tensor version needs about fifteen passes over
// the cut rows per round, most of them materialising [rows, dim] temporaries; here a round is
// five fused passes with the per-cluster accumulators in cache, which is what makes the
// target-rate mode cheap enough on CPU. Dot products and axis sums are fp32 (as in the tensor
// version), centroids and SSEs accumulate in double; the summation order differs, so the
// partitions agree with the tensor version except where a row sits on a cut (tests compare).
// Python validates the inputs (clustering.cluster_to_budget); the checks here only guard
// memory accesses.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = std::int64_t;
template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// fp32 dot product with 8 independent partial sums (vectorises without -ffast-math).
inline float dot(const float* a, const float* b, i64 n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  i64 j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[j + k] * b[j + k];
  for (; j < n; ++j) part[0] += a[j] * b[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename T>
inline void axpy(T a, const float* x, T* y, i64 n) {
  for (i64 j = 0; j < n; ++j) y[j] += a * x[j];
}

i64 bit_length(i64 v) {
  i64 bits = 0;
  while (v > 0) {
    ++bits;
    v >>= 1;
  }
  return bits;
}

// The working state: residuals r = x - centroid, their squared norms, per-cluster stats.
struct State {
  const float* x;
  i64 rows, dim;
  std::vector<float> r;
  std::vector<float> d;
  std::vector<i64> cluster;
  std::vector<i64> count;
  std::vector<double> sse;
  std::vector<i64> expert;  // of each cluster
};

// Recompute the centroids, residuals and SSEs of the rows `rows_n`, grouped by their local
// cluster ids `local_n` in [0, num_local); writes SSE and count of local cluster k to
// out_sse / out_count.
void refresh(State& st, const std::vector<i64>& rows_n, const std::vector<i64>& local_n,
             i64 num_local, std::vector<double>& out_sse, std::vector<i64>& out_count) {
  const i64 D = st.dim;
  std::vector<double> mean(num_local * D, 0.0);
  out_count.assign(num_local, 0);
  out_sse.assign(num_local, 0.0);
  for (size_t i = 0; i < rows_n.size(); ++i) {
    const i64 k = local_n[i];
    axpy(1.0, st.x + rows_n[i] * D, mean.data() + k * D, D);
    ++out_count[k];
  }
  for (i64 k = 0; k < num_local; ++k) {
    const double inv = 1.0 / static_cast<double>(std::max<i64>(out_count[k], 1));
    for (i64 j = 0; j < D; ++j) mean[k * D + j] *= inv;
  }
  for (size_t i = 0; i < rows_n.size(); ++i) {
    const i64 row = rows_n[i], k = local_n[i];
    const float* xr = st.x + row * D;
    float* rr = st.r.data() + row * D;
    const double* m = mean.data() + k * D;
    double dd = 0;
    for (i64 j = 0; j < D; ++j) {
      rr[j] = static_cast<float>(xr[j] - m[j]);
      dd += static_cast<double>(rr[j]) * rr[j];
    }
    st.d[row] = static_cast<float>(dd);
    out_sse[k] += dd;
  }
}

// Which clusters each expert cuts this round (ascending cluster ids).
std::vector<i64> pick(const State& st, const std::vector<i64>& allowed, i64 num_experts,
                      double ratio) {
  const i64 num = static_cast<i64>(st.count.size());
  std::vector<double> key(num);
  for (i64 c = 0; c < num; ++c) key[c] = st.count[c] >= 2 ? st.sse[c] : -1.0;
  if (ratio > 0) {
    std::vector<double> top(num_experts, -1.0);
    for (i64 c = 0; c < num; ++c) top[st.expert[c]] = std::max(top[st.expert[c]], key[c]);
    for (i64 c = 0; c < num; ++c)
      if (!(key[c] >= ratio * top[st.expert[c]])) key[c] = -1.0;
  }
  std::vector<std::vector<i64>> by_expert(num_experts);
  for (i64 c = 0; c < num; ++c)
    if (key[c] >= 0) by_expert[st.expert[c]].push_back(c);
  std::vector<i64> chosen;
  for (i64 e = 0; e < num_experts; ++e) {
    auto& cand = by_expert[e];
    const i64 take = std::min<i64>(allowed[e], static_cast<i64>(cand.size()));
    if (take <= 0) continue;
    auto larger = [&](i64 a, i64 b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
    std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), larger);
    chosen.insert(chosen.end(), cand.begin(), cand.begin() + take);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

// The side of each cut row (true: the new cluster); rows_n / seg_n as in refresh.
std::vector<char> cut(const State& st, const std::vector<i64>& rows_n,
                      const std::vector<i64>& seg_n, const std::vector<i64>& count_u,
                      int power_iters, int refine_iters, bool by_order) {
  const i64 D = st.dim, num = static_cast<i64>(count_u.size());
  const size_t n = rows_n.size();
  std::vector<char> side(n, 0);
  if (!by_order) {
    // Start each axis at the row farthest from its centroid (lowest row on ties).
    std::vector<i64> far(num, -1);
    for (size_t i = 0; i < n; ++i) {
      const i64 s = seg_n[i];
      if (far[s] < 0 || st.d[rows_n[i]] > st.d[far[s]]) far[s] = rows_n[i];
    }
    std::vector<float> v(num * D), acc(num * D);
    for (i64 s = 0; s < num; ++s)
      for (i64 j = 0; j < D; ++j) v[s * D + j] = st.r[far[s] * D + j];
    for (int it = 0; it < power_iters; ++it) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t i = 0; i < n; ++i) {
        const float* rr = st.r.data() + rows_n[i] * D;
        const i64 s = seg_n[i];
        axpy(dot(rr, v.data() + s * D, D), rr, acc.data() + s * D, D);
      }
      for (i64 s = 0; s < num; ++s) {
        double nrm = 0;
        for (i64 j = 0; j < D; ++j) nrm += static_cast<double>(acc[s * D + j]) * acc[s * D + j];
        const float inv = static_cast<float>(1.0 / std::max(std::sqrt(nrm), 1e-30));
        for (i64 j = 0; j < D; ++j) v[s * D + j] = acc[s * D + j] * inv;
      }
    }
    // Side by the axis, with the totals and the new half's sums for the 2-means steps.
    std::vector<float> total(num * D, 0.0f), s1(num * D, 0.0f);
    std::vector<double> n1(num, 0.0);
    for (size_t i = 0; i < n; ++i) {
      const float* rr = st.r.data() + rows_n[i] * D;
      const i64 s = seg_n[i];
      side[i] = dot(rr, v.data() + s * D, D) > 0;
      axpy(1.0f, rr, total.data() + s * D, D);
      if (side[i]) {
        axpy(1.0f, rr, s1.data() + s * D, D);
        n1[s] += 1;
      }
    }
    std::vector<float> w(num * D);
    std::vector<double> bias(num);
    std::vector<char> ok(num);
    for (int it = 0; it < refine_iters; ++it) {
      for (i64 s = 0; s < num; ++s) {
        const double c1 = std::max(n1[s], 1.0), c0 = std::max(count_u[s] - n1[s], 1.0);
        double q1 = 0, q0 = 0;
        for (i64 j = 0; j < D; ++j) {
          const double m1 = s1[s * D + j] / c1;
          const double m0 = (static_cast<double>(total[s * D + j]) - s1[s * D + j]) / c0;
          w[s * D + j] = m1 - m0;
          q1 += m1 * m1;
          q0 += m0 * m0;
        }
        bias[s] = 0.5 * (q1 - q0);
        ok[s] = n1[s] > 0 && n1[s] < count_u[s];
      }
      std::fill(s1.begin(), s1.end(), 0.0f);
      std::fill(n1.begin(), n1.end(), 0.0);
      for (size_t i = 0; i < n; ++i) {
        const float* rr = st.r.data() + rows_n[i] * D;
        const i64 s = seg_n[i];
        if (ok[s]) side[i] = dot(rr, w.data() + s * D, D) > bias[s];
        if (side[i]) {
          axpy(1.0f, rr, s1.data() + s * D, D);
          n1[s] += 1;
        }
      }
    }
  }
  // A cut that leaves a side empty cuts by row order: the first half stays.
  std::vector<i64> ones(num, 0), rank(num, 0);
  for (size_t i = 0; i < n; ++i) ones[seg_n[i]] += side[i];
  for (size_t i = 0; i < n; ++i) {
    const i64 s = seg_n[i];
    if (ones[s] == 0 || ones[s] == count_u[s]) side[i] = rank[s] >= count_u[s] / 2;
    ++rank[s];
  }
  return side;
}

py::array_t<i64> split_rounds(const carray<float>& x_RD, const carray<i64>& expert_R,
                              const carray<i64>& cluster_R, const carray<i64>& target_E,
                              int power_iters, int refine_iters, double fraction, double ratio) {
  if (x_RD.ndim() != 2) throw std::invalid_argument("x_RD must be 2-D");
  State st;
  st.rows = x_RD.shape(0);
  st.dim = x_RD.shape(1);
  st.x = x_RD.data();
  const i64 R = st.rows, D = st.dim, E = target_E.shape(0);
  if (expert_R.shape(0) != R || cluster_R.shape(0) != R)
    throw std::invalid_argument("expert_R and cluster_R need one entry per row");
  const i64* ex = expert_R.data();
  const i64* target = target_E.data();
  st.cluster.assign(cluster_R.data(), cluster_R.data() + R);
  i64 num = 0;
  for (i64 i = 0; i < R; ++i) {
    if (ex[i] < 0 || ex[i] >= E || st.cluster[i] < 0)
      throw std::invalid_argument("expert or cluster id out of range");
    num = std::max(num, st.cluster[i] + 1);
  }
  st.r.assign(R * D, 0.0f);
  st.d.assign(R, 0.0f);
  st.expert.assign(num, -1);
  for (i64 i = 0; i < R; ++i)
    if (st.expert[st.cluster[i]] < 0) st.expert[st.cluster[i]] = ex[i];
  std::vector<i64> clusters_E(E, 0);
  for (i64 c = 0; c < num; ++c) {
    if (st.expert[c] < 0) throw std::invalid_argument("cluster ids must be dense (0..C-1)");
    ++clusters_E[st.expert[c]];
  }
  {
    py::gil_scoped_release release;
    std::vector<i64> all_rows(R);
    for (i64 i = 0; i < R; ++i) all_rows[i] = i;
    refresh(st, all_rows, st.cluster, num, st.sse, st.count);
    const i64 bits = bit_length(R);
    const i64 ratio_rounds = 4 * bits + 8;
    const i64 axis_rounds = ratio_rounds +
        2 * static_cast<i64>(std::ceil(bits / std::log2(1.0 + fraction))) + 4;
    std::vector<i64> allowed(E), sel_id, rows_n, seg_n, local_n, count_u;
    std::vector<double> sse_2s;
    std::vector<i64> cnt_2s;
    for (i64 round = 0; round < axis_rounds + bits + 2; ++round) {
      bool any = false;
      const bool by_order = round >= axis_rounds;
      for (i64 e = 0; e < E; ++e) {
        const i64 remaining = target[e] - clusters_E[e];
        any = any || remaining > 0;
        allowed[e] = by_order ? remaining
                              : std::min<i64>(remaining, static_cast<i64>(std::ceil(
                                                             clusters_E[e] * fraction)));
      }
      if (!any) {
        py::gil_scoped_acquire acquire;
        py::array_t<i64> out(R);
        std::copy(st.cluster.begin(), st.cluster.end(), out.mutable_data());
        return out;
      }
      const std::vector<i64> parent = pick(st, allowed, E, round < ratio_rounds ? ratio : 0.0);
      const i64 num_cut = static_cast<i64>(parent.size());
      sel_id.assign(num, -1);
      count_u.resize(num_cut);
      for (i64 s = 0; s < num_cut; ++s) {
        sel_id[parent[s]] = s;
        count_u[s] = st.count[parent[s]];
      }
      rows_n.clear();
      seg_n.clear();
      for (i64 i = 0; i < R; ++i) {
        const i64 s = sel_id[st.cluster[i]];
        if (s >= 0) {
          rows_n.push_back(i);
          seg_n.push_back(s);
        }
      }
      const std::vector<char> side =
          cut(st, rows_n, seg_n, count_u, power_iters, refine_iters, by_order);
      // The parent keeps its id; the new half of cut s gets id num + s.
      local_n.resize(rows_n.size());
      for (size_t i = 0; i < rows_n.size(); ++i) {
        local_n[i] = seg_n[i] + (side[i] ? num_cut : 0);
        if (side[i]) st.cluster[rows_n[i]] = num + seg_n[i];
      }
      refresh(st, rows_n, local_n, 2 * num_cut, sse_2s, cnt_2s);
      st.sse.resize(num + num_cut);
      st.count.resize(num + num_cut);
      st.expert.resize(num + num_cut);
      for (i64 s = 0; s < num_cut; ++s) {
        st.sse[parent[s]] = sse_2s[s];
        st.count[parent[s]] = cnt_2s[s];
        st.sse[num + s] = sse_2s[num_cut + s];
        st.count[num + s] = cnt_2s[num_cut + s];
        st.expert[num + s] = st.expert[parent[s]];
        ++clusters_E[st.expert[parent[s]]];
      }
      num += num_cut;
    }
  }
  throw std::runtime_error("cluster splitting did not reach the budget");
}

}  // namespace

PYBIND11_MODULE(_split, m) {
  m.doc() = "Split rounds of the target-rate clustering (see clustering._split_rounds_torch).";
  m.def("split_rounds", &split_rounds, py::arg("x_RD"), py::arg("expert_R"),
        py::arg("cluster_R"), py::arg("target_E"), py::arg("power_iters"),
        py::arg("refine_iters"), py::arg("fraction"), py::arg("ratio"),
        "Cut clusters until every expert has its target count; returns the [R] cluster ids.");
}
