// Paged attention of decode tokens on CPU, reading K/V blocks where they lie in the cache.
//
// One query token per sequence attends to its seq_len cached tokens. The cache layout is
// glm_kernels/reference.py's: [num_blocks, block_size, kv_heads, head_dim]; a sequence's token t sits in block
// block_tables[s][t / block_size] at offset t % block_size. GQA: the `heads / kv_heads` query heads of one
// KV head are processed together, so each K and V row is read from memory once for all of them.
//
// Work items are sequences spread over ATen's intra-op threads; a sequence's blocks are read whole, in
// order, for all heads, with the next block prefetched (blocks lie anywhere in the cache). Per sequence, two
// passes over the context: scores q.k for every token and head (K read once), a numerically stable softmax
// in fp32, then the weighted sum of V rows (V read once). Inputs may be fp32, bf16 or fp16; arithmetic is fp32 in ATen's
// Vectorized<float> (AVX-512 / AVX2 as the build flags in glm_kernels/cpu_paged.py select).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// Ask for the next block's bytes while the current block is computed on: blocks lie anywhere in the
// cache, which the hardware prefetchers cannot guess.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 1);
}

template <typename T>
inline void as_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  if (i < n) acc = acc + Vec::loadu(a + i, n - i) * Vec::loadu(b + i, n - i);
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  if (i < n) at::vec::fmadd(va, Vec::loadu(x + i, n - i), Vec::loadu(y + i, n - i)).store(y + i, n - i);
}

// row[0:n] = exp(row - max); returns the sum.
inline float exp_sum(float* row, int64_t n, float mx) {
  const Vec vmax(mx);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(row + i) - vmax).exp_u20();
    e.store(row + i);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) {
    row[i] = std::exp(row[i] - mx);
    sum += row[i];
  }
  return sum;
}

// Head dims known at compile time (kDim > 0, a multiple of Vec::size()) unroll the row loops and keep the
// output accumulators of a block in registers; kDim == 0 handles any head dim.
template <int64_t kDim>
struct Rows {
  static constexpr int64_t kVecs = kDim / Vec::size();
  static float dot(const float* a, const float* b, int64_t) {
    Vec acc[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) acc[i] = Vec::loadu(a + i * Vec::size()) * Vec::loadu(b + i * Vec::size());
    for (int64_t w = kVecs / 2; w > 0; w /= 2)
      for (int64_t i = 0; i < w; ++i) acc[i] = acc[i] + acc[i + w];
    return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[0]);
  }
  // acc += sum_j p[j] * rows[j], rows `stride` apart.
  static void weighted_sum(const float* p, const float* rows, int64_t stride, int64_t n, float* acc, int64_t) {
    Vec a[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) a[i] = Vec::loadu(acc + i * Vec::size());
    for (int64_t j = 0; j < n; ++j) {
      const Vec pj(p[j]);
      for (int64_t i = 0; i < kVecs; ++i) a[i] = at::vec::fmadd(pj, Vec::loadu(rows + j * stride + i * Vec::size()), a[i]);
    }
    for (int64_t i = 0; i < kVecs; ++i) a[i].store(acc + i * Vec::size());
  }
};

template <>
struct Rows<0> {
  static float dot(const float* a, const float* b, int64_t n) { return ::dot(a, b, n); }
  static void weighted_sum(const float* p, const float* rows, int64_t stride, int64_t n, float* acc, int64_t d) {
    for (int64_t j = 0; j < n; ++j) axpy(p[j], rows + j * stride, acc, d);
  }
};

template <typename T, int64_t kDim>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  using R = Rows<kDim>;
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), v_dim = v_cache.size(3);
  const int64_t rep = heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t k_block_stride = block_size * kv_heads * dim, k_token_stride = kv_heads * dim;
  const int64_t v_block_stride = block_size * kv_heads * v_dim, v_token_stride = kv_heads * v_dim;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  constexpr bool kFloat = std::is_same_v<T, float>;

  // One work item per sequence: its blocks are read whole and in order, for all KV heads at once.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * dim), acc(heads * v_dim), scores, denom(heads);
    std::vector<float> block_buf(kFloat ? 0 : block_size * kv_heads * std::max(dim, v_dim));
    for (int64_t s = begin; s < end; ++s) {
      const int64_t len = lens[s];
      const int32_t* table = tables + s * max_blocks;
      for (int64_t i = 0; i < heads * dim; ++i)
        qf[i] = static_cast<float>(qp[s * heads * dim + i]) * static_cast<float>(scale);
      scores.resize(heads * len);  // [head][token]
      // The fp32 rows of the block holding token t0 of `cache` (a non-fp32 block is converted once into
      // block_buf), with the sequence's next block asked for meanwhile.
      auto block_rows = [&](const T* cache, int64_t block_stride, int64_t token_stride, int64_t t0) -> const float* {
        const int64_t b = t0 / block_size;
        if (t0 + block_size < len)
          prefetch(cache + static_cast<int64_t>(table[b + 1]) * block_stride,
                   std::min(block_size, len - t0 - block_size) * token_stride * sizeof(T));
        const T* rows = cache + static_cast<int64_t>(table[b]) * block_stride;
        if constexpr (kFloat) {
          return rows;
        } else {
          as_float(rows, block_buf.data(), std::min(block_size, len - t0) * token_stride);
          return block_buf.data();
        }
      };
      // Pass 1: scores, block by block.
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const float* rows = block_rows(kp, k_block_stride, k_token_stride, t0);
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t h = 0; h < heads; ++h)
            scores[h * len + t0 + j] = R::dot(qf.data() + h * dim, rows + j * k_token_stride + (h / rep) * dim, dim);
      }
      // Softmax per query head.
      for (int64_t h = 0; h < heads; ++h) {
        float* row = scores.data() + h * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, row[t]);
        denom[h] = exp_sum(row, len, mx);
      }
      // Pass 2: weighted sum of V rows, block by block.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const float* rows = block_rows(vp, v_block_stride, v_token_stride, t0);
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t h = 0; h < heads; ++h)
          R::weighted_sum(scores.data() + h * len + t0, rows + (h / rep) * v_dim, v_token_stride, n,
                          acc.data() + h * v_dim, v_dim);
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* o = op + (s * heads + h) * v_dim;
        const float inv = len > 0 ? 1.f / denom[h] : 0.f;
        for (int64_t i = 0; i < v_dim; ++i) o[i] = static_cast<T>(acc[h * v_dim + i] * inv);
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "q [S, H, D], caches [N, B, KVH, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0),
              "one block table and one length per sequence");
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) &&
                  v_cache.size(2) == k_cache.size(2),
              "k_cache and v_cache must have the same blocks, block size and KV heads");
  // The kernel trusts every block id it reads: check them (a few thousand ints) before any thread starts.
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < q.size(0); ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "sequence ", s, ": length ", lens[s],
                " needs more than its ", max_blocks, " blocks of ", block_size, " (or is < 1)");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks, "sequence ", s,
                  ": block id ", tables[s * max_blocks + b], " outside the cache's ", num_blocks, " blocks");
  }
  auto out = at::empty({q.size(0), q.size(1), v_cache.size(3)}, q.options());
  const int64_t dim = q.size(2), v_dim = v_cache.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    if (dim == v_dim && dim == 64 && dim % Vec::size() == 0)
      decode<scalar_t, 64>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
    else if (dim == v_dim && dim == 128 && dim % Vec::size() == 0)
      decode<scalar_t, 128>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
    else
      decode<scalar_t, 0>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(glm_serve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
}
