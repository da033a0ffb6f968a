// Rank / vote accumulation over blocks of per-ranker scores (the Rank and Vote aggregations).
//
// A *ranker* is one row of a score block: the scores that one (unit, test sample) pair gives to the N
// train samples. Each ranker ranks the train samples ascending (0 = most detrimental). Ties get the
// average rank; to keep everything in exact integer arithmetic we work with the *doubled* average rank
//     r2 = lo + hi,
// where [lo, hi] are the 0-based positions of the tie group in sorted order (so rank = r2 / 2).
// The Vote aggregation gives max(0, K - rank), i.e. doubled: v2 = max(0, 2K - r2).
//
// Two phases per block, both multi-threaded with std::thread and run without the GIL:
//   1. rows in parallel: each row's scores become a row of int32 r2 in a scratch buffer the size of
//      the block;
//   2. train columns in parallel: each column accumulates its rows in row order into the outputs.
// Vote-only calls instead add each row's (sparse) votes into a per-thread int64 array, summed at the end.
// Integer sums are exact and the float64 reciprocal-rank sum is added in a fixed (row) order, so the
// result is bit-identical to the numpy reference (fastinf/_native.py) for any thread count.
//
// Sorting: float32 -> order-preserving uint32 key, packed with the column index into a uint64 and LSD
// radix-sorted on the key (three 11/11/10-bit passes; passes whose digit is constant are skipped).
// Vote-only calls need just the K lowest per row: a two-level radix *selection* (histograms of the top
// 11 and next 11 key bits) finds a key bound that keeps every column with rank < K plus its tie group,
// and only those ~K candidates are sorted: a few O(N) streaming passes plus a radix sort of ~K words
// instead of a radix sort of N.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace fastinf {
namespace {

constexpr int kDigitBits = 11;
constexpr uint32_t kBuckets = 1u << kDigitBits;
// Vote-only calls give each thread a private int64 accumulator when they all fit in this many bytes
// (the `private_bytes` argument; 0 forces the shared-buffer path, which tests use).
constexpr int64_t kPrivateBytes = int64_t(256) << 20;

// Order-preserving map float32 -> uint32 (a < b  <=>  key(a) < key(b)); -0.0 and +0.0 share a key.
inline uint32_t ordered_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// LSD radix sort of packed (key << 32 | index) words by their upper 32 bits. `tmp` has room for n.
void radix_sort(uint64_t* a, uint64_t* tmp, size_t n) {
  static constexpr int kShift[3] = {32, 43, 54};
  static constexpr uint32_t kMask[3] = {kBuckets - 1, kBuckets - 1, (1u << 10) - 1};
  std::vector<size_t> hist(3 * kBuckets, 0);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t w = a[i];
    for (int p = 0; p < 3; ++p) ++hist[p * kBuckets + ((w >> kShift[p]) & kMask[p])];
  }
  uint64_t* src = a;
  uint64_t* dst = tmp;
  for (int p = 0; p < 3; ++p) {
    size_t* h = &hist[p * kBuckets];
    bool constant = false;
    for (uint32_t b = 0; b <= kMask[p]; ++b) {
      if (h[b] == n) constant = true;
    }
    if (constant) continue;  // every word has the same digit: the pass would not move anything
    size_t sum = 0;
    for (uint32_t b = 0; b <= kMask[p]; ++b) {
      const size_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint64_t w = src[i];
      dst[h[(w >> kShift[p]) & kMask[p]]++] = w;
    }
    std::swap(src, dst);
  }
  if (src != a) std::memcpy(a, src, n * sizeof(uint64_t));
}

// Walks sorted packed words; calls emit(index, r2) with r2 = lo + hi of each tie group. Stops after
// the first tie group whose start is >= stop_at (vote-only calls pass K; rank calls pass n).
template <class Emit>
void walk_ties(const uint64_t* s, size_t n, size_t stop_at, Emit emit) {
  size_t lo = 0;
  while (lo < n && lo < stop_at) {
    const uint64_t key = s[lo] >> 32;
    size_t hi = lo;
    while (hi + 1 < n && (s[hi + 1] >> 32) == key) ++hi;
    const int64_t r2 = static_cast<int64_t>(lo + hi);
    for (size_t t = lo; t <= hi; ++t) emit(static_cast<uint32_t>(s[t] & 0xFFFFFFFFu), r2);
    lo = hi + 1;
  }
}

struct RowScratch {
  std::vector<uint64_t> words, tmp;
  std::vector<uint32_t> keys;
};

// Returns false if the row holds a NaN.
bool make_keys(const float* row, size_t n, uint32_t* keys) {
  bool ok = true;
  for (size_t i = 0; i < n; ++i) {
    const float x = row[i];
    ok &= (x == x);
    keys[i] = ordered_key(x);
  }
  return ok;
}

// Full path: out[i] = r2 of column i.
bool rank_row(const float* row, size_t n, int32_t* out, RowScratch& sc) {
  sc.keys.resize(n);
  if (!make_keys(row, n, sc.keys.data())) return false;
  sc.words.resize(n);
  sc.tmp.resize(n);
  for (size_t i = 0; i < n; ++i) sc.words[i] = (uint64_t(sc.keys[i]) << 32) | uint64_t(i);
  radix_sort(sc.words.data(), sc.tmp.data(), n);
  walk_ties(sc.words.data(), n, n, [&](uint32_t i, int64_t r2) { out[i] = static_cast<int32_t>(r2); });
  return true;
}

// Partial path: calls emit(i, v2) with v2 = max(0, 2K - r2) > 0 for every column i that gets a vote,
// sorting only the candidates that can get one.
template <class Emit>
bool vote_row(const float* row, size_t n, size_t k, RowScratch& sc, Emit emit) {
  sc.keys.resize(n);
  uint32_t* keys = sc.keys.data();
  if (!make_keys(row, n, keys)) return false;
  // Level 1: top 11 bits. Find the bucket holding the K-th smallest key.
  std::vector<size_t> h1(kBuckets, 0), h2(kBuckets, 0);
  for (size_t i = 0; i < n; ++i) ++h1[keys[i] >> 21];
  size_t below = 0;
  uint32_t b1 = 0;
  while (below + h1[b1] < k) below += h1[b1++];
  uint32_t bound = (b1 << 21) | 0x1FFFFFu;  // candidates: keys <= bound
  size_t n_cand = below + h1[b1];
  // Level 2: next 11 bits inside bucket b1, when that bucket is much larger than what is needed.
  if (h1[b1] > 64 && h1[b1] > (k - below) + (k - below) / 4) {
    for (size_t i = 0; i < n; ++i) {
      if ((keys[i] >> 21) == b1) ++h2[(keys[i] >> 10) & (kBuckets - 1)];
    }
    uint32_t b2 = 0;
    while (below + h2[b2] < k) below += h2[b2++];
    bound = (b1 << 21) | (b2 << 10) | 0x3FFu;
    n_cand = below + h2[b2];
  }
  // Every key <= bound is a candidate; they form a prefix of the sorted order that ends on a complete
  // tie group (equal keys share their digits), so their positions among themselves are global ranks.
  sc.words.resize(n_cand);
  sc.tmp.resize(n_cand);
  size_t c = 0;
  for (size_t i = 0; i < n; ++i) {
    if (keys[i] <= bound) sc.words[c++] = (uint64_t(keys[i]) << 32) | uint64_t(i);
  }
  radix_sort(sc.words.data(), sc.tmp.data(), n_cand);
  const int64_t k2 = 2 * static_cast<int64_t>(k);
  walk_ties(sc.words.data(), n_cand, k, [&](uint32_t i, int64_t r2) {
    if (r2 < k2) emit(i, k2 - r2);
  });
  return true;
}

template <class Fn>
void parallel_for(size_t n_items, int n_threads, Fn fn) {
  const size_t t_count = std::max<size_t>(1, std::min<size_t>(n_threads, n_items));
  if (t_count == 1) {
    fn(0, 0, n_items);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t_count);
  for (size_t t = 0; t < t_count; ++t) {
    const size_t a = n_items * t / t_count, b = n_items * (t + 1) / t_count;
    pool.emplace_back(fn, t, a, b);
  }
  for (auto& th : pool) th.join();
}

template <class T>
T* optional_out(const py::object& obj, size_t n, const char* name) {
  if (obj.is_none()) return nullptr;
  auto arr = obj.cast<py::array_t<T, py::array::c_style>>();
  if (arr.ndim() != 1 || static_cast<size_t>(arr.shape(0)) != n) {
    throw std::invalid_argument(std::string(name) + ": expected a 1-D array of length " + std::to_string(n) +
                                ", found shape with " + std::to_string(arr.ndim()) + " dims");
  }
  if (!arr.writeable()) throw std::invalid_argument(std::string(name) + ": array is read-only");
  // The caller passes an exact-dtype contiguous array (checked in fastinf/_native.py), so the cast
  // above does not copy and writes land in the caller's buffer.
  if (arr.ptr() != obj.ptr()) {
    throw std::invalid_argument(std::string(name) + ": expected a C-contiguous array of the exact dtype");
  }
  return arr.mutable_data();
}

void accumulate_ranks(py::array_t<float, py::array::c_style | py::array::forcecast> scores, int64_t vote_k,
                      py::object rank_sum2, py::object vote_sum2, py::object min_rank2, py::object rrf_sum,
                      int64_t rrf_k, int n_threads, int64_t private_bytes) {
  if (scores.ndim() != 2) throw std::invalid_argument("scores: expected a 2-D (rankers, train) block");
  const size_t rows = scores.shape(0), n = scores.shape(1);
  if (n == 0 || n >= (size_t(1) << 30)) {
    throw std::invalid_argument("scores: expected 1 <= N < 2^30 train columns, found " + std::to_string(n));
  }
  int64_t* rs = optional_out<int64_t>(rank_sum2, n, "rank_sum2");
  int64_t* vs = optional_out<int64_t>(vote_sum2, n, "vote_sum2");
  int64_t* mn = optional_out<int64_t>(min_rank2, n, "min_rank2");
  double* rr = optional_out<double>(rrf_sum, n, "rrf_sum");
  if (vs && (vote_k < 1 || static_cast<size_t>(vote_k) > n)) {
    throw std::invalid_argument("vote_k: expected 1 <= K <= N = " + std::to_string(n) + ", found " +
                                std::to_string(vote_k));
  }
  if (rr && rrf_k < 0) throw std::invalid_argument("rrf_k: expected >= 0");
  if (rows == 0 || (!rs && !vs && !mn && !rr)) return;
  const bool vote_only = vs && !rs && !mn && !rr;
  const float* data = scores.data();
  std::atomic<long long> bad_row{-1};
  auto flag_bad = [&](size_t r) {
    long long expected = -1;
    bad_row.compare_exchange_strong(expected, static_cast<long long>(r));
  };
  const size_t t_count = std::max<size_t>(1, std::min<size_t>(std::max(1, n_threads), rows));
  if (vote_only && static_cast<int64_t>(t_count * n * sizeof(int64_t)) <= private_bytes) {
    // Vote only: each thread adds its rows' (sparse, ~K per row) votes into a private int64 array; the
    // arrays are then summed per column. Integer sums, so the result is independent of the split.
    std::vector<std::vector<int64_t>> acc(t_count);
    {
      py::gil_scoped_release release;
      parallel_for(rows, static_cast<int>(t_count), [&](size_t t, size_t a, size_t b) {
        RowScratch sc;
        acc[t].assign(n, 0);
        int64_t* mine = acc[t].data();
        for (size_t r = a; r < b; ++r) {
          if (!vote_row(data + r * n, n, vote_k, sc, [&](uint32_t i, int64_t v2) { mine[i] += v2; })) flag_bad(r);
        }
      });
      if (bad_row.load() < 0) {
        parallel_for(n, n_threads, [&](size_t, size_t a, size_t b) {
          for (size_t t = 0; t < t_count; ++t) {
            const int64_t* src = acc[t].data();
            for (size_t i = a; i < b; ++i) vs[i] += src[i];
          }
        });
      }
    }
    if (bad_row.load() >= 0) {
      throw std::domain_error("scores: NaN in block row " + std::to_string(bad_row.load()));
    }
    return;
  }
  std::vector<int32_t> buf(rows * n);
  {
    py::gil_scoped_release release;
    parallel_for(rows, n_threads, [&](size_t, size_t a, size_t b) {
      RowScratch sc;
      for (size_t r = a; r < b; ++r) {
        int32_t* out = &buf[r * n];
        bool ok;
        if (vote_only) {
          std::fill(out, out + n, 0);
          ok = vote_row(data + r * n, n, vote_k, sc,
                        [&](uint32_t i, int64_t v2) { out[i] = static_cast<int32_t>(v2); });
        } else {
          ok = rank_row(data + r * n, n, out, sc);
        }
        if (!ok) flag_bad(r);
      }
    });
    if (bad_row.load() < 0) {
      const int64_t k2 = 2 * vote_k;
      const double two_k2 = static_cast<double>(2 * rrf_k + 2);
      parallel_for(n, n_threads, [&](size_t, size_t a, size_t b) {
        for (size_t r = 0; r < rows; ++r) {
          const int32_t* row = &buf[r * n];
          for (size_t i = a; i < b; ++i) {
            const int64_t v = row[i];
            if (vote_only) {
              vs[i] += v;
              continue;
            }
            if (rs) rs[i] += v;
            if (vs) vs[i] += std::max<int64_t>(0, k2 - v);
            if (mn) mn[i] = std::min<int64_t>(mn[i], v);
            if (rr) rr[i] += 2.0 / (two_k2 + static_cast<double>(v));
          }
        }
      });
    }
  }
  if (bad_row.load() >= 0) {
    throw std::domain_error("scores: NaN in block row " + std::to_string(bad_row.load()));
  }
}

}  // namespace

void register_aggregate(py::module_& m) {
  m.def("accumulate_ranks", &accumulate_ranks, py::arg("scores"), py::arg("vote_k"), py::arg("rank_sum2"),
        py::arg("vote_sum2"), py::arg("min_rank2"), py::arg("rrf_sum"), py::arg("rrf_k"), py::arg("n_threads"),
        py::arg("private_bytes") = kPrivateBytes,
        R"doc(Accumulate doubled average ranks of each row of ``scores`` [rows, N] (float32) into outputs.

Per row, r2 = lo + hi (0-based sorted positions of the value's tie group), i.e. twice the average rank.
Outputs (1-D, length N, C-contiguous, or None to skip), updated in place:
  rank_sum2 int64  += r2              vote_sum2 int64 += max(0, 2*vote_k - r2)
  min_rank2 int64  = min(., r2)       rrf_sum float64 += 2 / (2*rrf_k + 2 + r2)   (rows in order)
Vote-only calls use partial radix selection. Raises ValueError on a NaN (outputs untouched).)doc");
}

}  // namespace fastinf
