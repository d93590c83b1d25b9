// Index builders for the datasets, in C++ for speed (pybind11 module megatron_lsh.data._helpers).
//
// Each function has a Python/numpy reference in helpers_ref.py with the same contract; the tests
// check that both agree on random inputs. Python-side validation lives in helpers.py; the checks
// here only guard against out-of-bounds memory access.
//
//   build_sample_idx        GPT: where each seq_length+1 token window starts and ends
//   build_blending_indices  blending: which dataset, and which sample of it, feeds each sample
//   build_mapping           MLM / T5: runs of whole sentences packed up to a token budget

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = std::int64_t;
using u64 = std::uint64_t;
template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// SplitMix64: tiny, seedable, and trivially reproduced in Python (helpers_ref.SplitMix64).
struct SplitMix64 {
  u64 state;
  explicit SplitMix64(u64 seed) : state(seed) {}
  u64 next() {
    state += 0x9E3779B97F4A7C15ULL;
    u64 z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
};

// Sample k of a GPT epoch covers token positions [k*S, k*S + S] of the stream made by
// concatenating the sequences doc_idx[0], doc_idx[1], ... (consecutive samples share one
// token: the last label of one is the first input of the next). Row k of the result is
// (position in doc_idx, offset in that sequence) of token k*S, for k = 0..num_samples, so
// sample k runs from row k to row k+1 inclusive. Empty sequences are stepped over.
py::array_t<i64> build_sample_idx(const carray<std::int32_t>& sizes, const carray<i64>& doc_idx,
                                  i64 seq_length, i64 num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be non-negative");
  const auto s = sizes.unchecked<1>();
  const auto d = doc_idx.unchecked<1>();
  const i64 n_docs = d.shape(0);
  const i64 n_sizes = s.shape(0);
  for (i64 i = 0; i < n_docs; ++i) {
    if (d(i) < 0 || d(i) >= n_sizes)
      throw std::invalid_argument("doc_idx entry " + std::to_string(d(i)) + " at position " +
                                  std::to_string(i) + " is outside the " +
                                  std::to_string(n_sizes) + " sequences");
  }
  py::array_t<i64> result({num_samples + 1, i64{2}});
  auto r = result.mutable_unchecked<2>();
  bool overrun = false;
  {
    py::gil_scoped_release release;
    i64 ptr = 0, off = 0;
    for (i64 k = 0; k <= num_samples && !overrun; ++k) {
      i64 remaining = (k == 0) ? 0 : seq_length;
      while (true) {
        if (ptr >= n_docs) { overrun = true; break; }
        const i64 len = s(d(ptr));
        if (off + remaining < len) { off += remaining; break; }
        remaining -= len - off;
        ++ptr;
        off = 0;
      }
      r(k, 0) = ptr;
      r(k, 1) = off;
    }
  }
  if (overrun)
    throw std::invalid_argument("the documents hold fewer tokens than num_samples * seq_length + 1");
  return result;
}

// Greedy blending: sample i goes to the dataset whose share lags most behind its weight,
// i.e. argmax_d (w_d * (i + 1) - taken_d), first index on ties. Returns (dataset index,
// index of the sample within that dataset).
py::tuple build_blending_indices(const carray<double>& weights, i64 size) {
  if (size < 0) throw std::invalid_argument("size must be non-negative");
  const auto w = weights.unchecked<1>();
  const i64 n = w.shape(0);
  if (n <= 0 || n > 32767) throw std::invalid_argument("need between 1 and 32767 datasets");
  py::array_t<std::int16_t> dataset_index(size);
  py::array_t<i64> dataset_sample_index(size);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  std::vector<double> wv(n);
  for (i64 j = 0; j < n; ++j) wv[j] = w(j);
  {
    py::gil_scoped_release release;
    std::vector<i64> taken(n, 0);
    for (i64 i = 0; i < size; ++i) {
      const double step = static_cast<double>(i + 1);
      i64 best = 0;
      double best_err = wv[0] * step - static_cast<double>(taken[0]);
      for (i64 j = 1; j < n; ++j) {
        const double err = wv[j] * step - static_cast<double>(taken[j]);
        if (err > best_err) { best_err = err; best = j; }
      }
      di(i) = static_cast<std::int16_t>(best);
      dsi(i) = taken[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

// Sentence-span mapping for MLM / T5. The documents are doc_bounds[d]..doc_bounds[d+1] (sentence
// indices into sizes). Walking the sentences in order, a sample takes whole consecutive
// sentences while their tokens (plus one separator per document boundary crossed, when
// cross_documents) stay within its target length; a sentence that alone exceeds the target
// forms a sample by itself (truncated later). The target is max_seq_length, or with
// probability short_seq_prob a length drawn uniformly from [2, max_seq_length]. Epochs repeat
// the walk (new targets) until max_num_samples rows or num_epochs. Rows: (first sentence,
// end sentence exclusive, target length).
py::array_t<i64> build_mapping(const carray<i64>& doc_bounds, const carray<std::int32_t>& sizes,
                               i64 max_seq_length, i64 num_epochs, i64 max_num_samples,
                               double short_seq_prob, u64 seed, bool cross_documents) {
  if (max_seq_length < 2) throw std::invalid_argument("max_seq_length must be at least 2");
  const auto b = doc_bounds.unchecked<1>();
  const auto s = sizes.unchecked<1>();
  const i64 n_docs = b.shape(0) - 1;
  if (n_docs < 0) throw std::invalid_argument("doc_bounds needs at least one entry");
  for (i64 d = 0; d < n_docs; ++d) {
    if (b(d) < 0 || b(d + 1) < b(d) || b(d + 1) > s.shape(0))
      throw std::invalid_argument("doc_bounds must be non-decreasing sentence indices within sizes");
  }
  std::vector<i64> rows;
  {
    py::gil_scoped_release release;
    SplitMix64 rng(seed);
    auto draw = [&]() -> i64 {
      if (short_seq_prob > 0.0 && rng.uniform() < short_seq_prob)
        return 2 + static_cast<i64>(rng.next() % static_cast<u64>(max_seq_length - 1));
      return max_seq_length;
    };
    i64 count = 0;
    bool full = (max_num_samples == 0);
    for (i64 epoch = 0; epoch < num_epochs && !full; ++epoch) {
      const i64 before = count;
      i64 start = -1, length = 0, target = draw();
      auto emit = [&](i64 end) {
        rows.push_back(start);
        rows.push_back(end);
        rows.push_back(target);
        ++count;
        if (max_num_samples >= 0 && count >= max_num_samples) full = true;
        target = draw();
      };
      for (i64 d = 0; d < n_docs && !full; ++d) {
        const i64 lo = b(d), hi = b(d + 1);
        for (i64 i = lo; i < hi && !full; ++i) {
          const i64 len = s(i);
          if (start < 0) { start = i; length = len; continue; }
          const i64 extra = (i == lo) ? 1 : 0;
          if (length + extra + len <= target) {
            length += extra + len;
          } else {
            emit(i);
            start = i;
            length = len;
          }
        }
        if (!cross_documents && start >= 0 && !full) {
          emit(hi);
          start = -1;
          length = 0;
        }
      }
      if (start >= 0 && !full) emit(b(n_docs));
      if (count == before) break;  // no sentences at all: further epochs add nothing
    }
  }
  const i64 n = static_cast<i64>(rows.size() / 3);
  py::array_t<i64> result({n, i64{3}});
  auto r = result.mutable_unchecked<2>();
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < 3; ++j) r(i, j) = rows[3 * i + j];
  return result;
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for megatron_lsh.data (see helpers_ref.py for the contracts)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_samples"),
        "GPT sample index: (num_samples + 1, 2) rows of (doc_idx position, offset).");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy blending: (dataset_index int16, dataset_sample_index int64).");
  m.def("build_mapping", &build_mapping, py::arg("doc_bounds"), py::arg("sizes"),
        py::arg("max_seq_length"), py::arg("num_epochs"), py::arg("max_num_samples"),
        py::arg("short_seq_prob"), py::arg("seed"), py::arg("cross_documents"),
        "Sentence-span mapping: (n, 3) rows of (first sentence, end sentence, target length).");
}
