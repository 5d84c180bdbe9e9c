// The elementwise work of ConvAttention2d over its (batch, heads, queries, keys) attention maps, on the CPU:
//
// content_mix (forward, float32): the content scores S = q^T k, their softmax A and the mix
//   M = (1 - w) P + w A with the positional maps, one map row at a time in the cache, written once (M, and A
//   where the caller keeps it for a backward).  Composed from PyTorch operators the scores, the softmax and
//   the mix each walk the maps in memory, and the softmax's exp costs as much as the rest of the three
//   together; here the exp is a polynomial on the vector lanes.
// map_gradients (backward, float32 and float64): from dM, the gradient of M, and A:
//   r            = sum_k dM * A                 (per map row: the softmax backward's row term)
//   dS           = A (dM - r)                   (written over dM; the caller scales by w later)
//   dP           = (1 - w) sum_b dM
//   dw partials  = sum_b r - sum_k (sum_b dM) P (one per (head, query) row; summed per head by the caller)
//   Composed from PyTorch operators these walk the maps about eight times (reads and writes); here dM and A
//   are read once and dS written once.  The work is split by blocks of (head, query) rows, each block's
//   batch sum of dM kept in the L1 cache while the images stream past, so every row's batch sum and
//   partials are finished by one thread and need no reduction across threads.
#include "binding.h"

#include "exp2.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------------
// Forward: content scores, softmax and mix.

#if defined(__AVX512F__)
constexpr int64_t LANES = 16;
#else
constexpr int64_t LANES = 8;  // AVX2, and portable builds (the compiler splits the vectors)
#endif
// Vectors with the alignment of their floats, and allowed to alias them: loads and stores are plain unaligned
// vector moves (a memcpy into a vector went through the stack in GCC's AVX2 code, stalling every load).
typedef float vf __attribute__((vector_size(LANES * 4), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
constexpr int64_t ROWS = 4;     // map rows (queries) computed together: each key vector loaded once for four
constexpr int64_t VECTORS = 2;  // key vectors per tile: ROWS x VECTORS accumulators in registers
constexpr int64_t TILE = VECTORS * LANES;
constexpr int64_t TASK_ROWS = 16;  // map rows per task of the thread pool
constexpr float LOG2_E = 1.4426950408889634f;

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf splat(float x) {
  vf v;
  for (int64_t lane = 0; lane < LANES; ++lane) v[lane] = x;
  return v;
}
inline vf maximum(vf a, vf b) { return a > b ? a : b; }

struct MixSizes {
  int64_t dim, keys, q_dim_stride, k_dim_stride;
};

// rows[r * stride + key] = sum_d q[d * q_dim_stride + r] * k[d * k_dim_stride + key] for r < R, all keys.
template <int64_t R>
void score_rows(const float* q, const float* k, const MixSizes& n, float* rows, int64_t stride) {
  int64_t key = 0;
  for (; key + TILE <= n.keys; key += TILE) {
    vf acc[R][VECTORS] = {};
    for (int64_t d = 0; d < n.dim; ++d) {
      vf column[VECTORS];
      for (int64_t j = 0; j < VECTORS; ++j) column[j] = load(k + d * n.k_dim_stride + key + j * LANES);
      for (int64_t r = 0; r < R; ++r) {
        const vf s = splat(q[d * n.q_dim_stride + r]);
        for (int64_t j = 0; j < VECTORS; ++j) acc[r][j] += s * column[j];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < VECTORS; ++j) store(rows + r * stride + key + j * LANES, acc[r][j]);
  }
  for (; key < n.keys; ++key) {
    float acc[R] = {};
    for (int64_t d = 0; d < n.dim; ++d)
      for (int64_t r = 0; r < R; ++r) acc[r] += q[d * n.q_dim_stride + r] * k[d * n.k_dim_stride + key];
    for (int64_t r = 0; r < R; ++r) rows[r * stride + key] = acc[r];
  }
}

// One map row from its scores (overwritten with 2^((s - max) log2 e)): mixed = base + w A, attention = A.
void softmax_mix_row(float* scores, const float* base, float weight, float* mixed, float* attention,
                     int64_t keys) {
  const int64_t whole = keys / LANES * LANES;
  float top = -INFINITY;
  if (whole) {
    vf running = load(scores);
    for (int64_t key = LANES; key < whole; key += LANES) running = maximum(running, load(scores + key));
    for (int64_t lane = 0; lane < LANES; ++lane) top = std::max(top, running[lane]);
  }
  for (int64_t key = whole; key < keys; ++key) top = std::max(top, scores[key]);
  // s - top first, exactly <= 0 for every score (scaling first could round the largest above zero).
  const vf highest = splat(top), log2_e = splat(LOG2_E);
  vf sums = {};
  for (int64_t key = 0; key < whole; key += LANES) {
    const vf e = exp2_nonpositive<vf, vi>((load(scores + key) - highest) * log2_e);
    store(scores + key, e);
    sums += e;
  }
  float sum = 0;
  for (int64_t lane = 0; lane < LANES; ++lane) sum += sums[lane];
  for (int64_t key = whole; key < keys; ++key) {
    scores[key] = std::exp2((scores[key] - top) * LOG2_E);
    sum += scores[key];
  }
  const float inverse = 1.0f / sum;
  const vf inv = splat(inverse), w = splat(weight);
  for (int64_t key = 0; key < whole; key += LANES) {
    const vf a = load(scores + key) * inv;
    store(mixed + key, load(base + key) + w * a);
    if (attention) store(attention + key, a);
  }
  for (int64_t key = whole; key < keys; ++key) {
    const float a = scores[key] * inverse;
    mixed[key] = base[key] + weight * a;
    if (attention) attention[key] = a;
  }
}

}  // namespace

// q (B, H, d, Q) and k (B, H, d, K), unit stride along the pixels, queries already scaled by 1/sqrt(d);
// base (H, Q, K): (1 - w) times the positional maps; weight (H,); mixed and attention (B, H, Q, K), contiguous
// (attention may be empty: not written).  Writes M into mixed and A into attention; float32 CPU tensors.
void content_mix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& base,
                 const at::Tensor& weight, const at::Tensor& mixed, const at::Tensor& attention) {
  for (const auto* t : {&q, &k, &base, &weight, &mixed, &attention})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "content_mix takes float32 CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(2) == k.size(2) && q.stride(3) == 1 && k.stride(3) == 1,
              "content_mix: q and k must be (B, H, d, pixels) with unit stride along the pixels");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(3), keys = k.size(3);
  TORCH_CHECK(base.is_contiguous() && base.dim() == 3 && base.size(0) == heads && base.size(1) == queries &&
                  base.size(2) == keys && weight.is_contiguous() && weight.numel() == heads,
              "content_mix: base must be contiguous (H, Q, K) and weight (H,)");
  TORCH_CHECK(mixed.is_contiguous() && mixed.dim() == 4 && mixed.size(0) == batch && mixed.size(1) == heads &&
                  mixed.size(2) == queries && mixed.size(3) == keys,
              "content_mix: mixed must be contiguous (B, H, Q, K)");
  const bool keep = attention.numel() > 0;
  TORCH_CHECK(!keep || (attention.is_contiguous() && attention.sizes() == mixed.sizes()),
              "content_mix: attention must be empty or like mixed");
  const MixSizes n{q.size(2), keys, q.stride(2), k.stride(2)};
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k.data_ptr<float>();
  const float* base_ptr = base.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  float* m_ptr = mixed.data_ptr<float>();
  float* a_ptr = keep ? attention.data_ptr<float>() : nullptr;
  const int64_t blocks = (queries + TASK_ROWS - 1) / TASK_ROWS;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(TASK_ROWS * keys, 1));
  at::parallel_for(0, batch * heads * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(ROWS * keys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, h = bh % heads, b = bh / heads;
      const int64_t first = task % blocks * TASK_ROWS, last = std::min(first + TASK_ROWS, queries);
      const float* qh = q_ptr + b * q.stride(0) + h * q.stride(1);
      const float* kh = k_ptr + b * k.stride(0) + h * k.stride(1);
      for (int64_t row = first; row < last; row += ROWS) {
        const int64_t count = std::min(ROWS, last - row);
        if (count == ROWS) {
          score_rows<ROWS>(qh + row, kh, n, rows.data(), keys);
        } else {
          for (int64_t r = 0; r < count; ++r) score_rows<1>(qh + row + r, kh, n, rows.data() + r * keys, keys);
        }
        for (int64_t r = 0; r < count; ++r) {
          const int64_t offset = (bh * queries + row + r) * keys;
          softmax_mix_row(rows.data() + r * keys, base_ptr + (h * queries + row + r) * keys, w_ptr[h],
                          m_ptr + offset, a_ptr ? a_ptr + offset : nullptr, keys);
        }
      }
    }
  });
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// Backward: the softmax backward and the positional maps' and content weights' gradients.

constexpr int64_t BLOCK_ELEMENTS = 4096;  // elements of a block's batch sum of dM (16 KiB in float32)

struct Wanted {
  bool scores, positional, weight;
};

template <typename T>
void map_gradients(T* dm, const T* a, const T* p, const T* w, T* dp, T* dw, int64_t batch, int64_t heads,
                   int64_t queries, int64_t keys, Wanted wanted) {
  const int64_t rows = heads * queries;
  const bool summed = wanted.positional || wanted.weight;
  // Blocks of about BLOCK_ELEMENTS, as many as a multiple of the threads (each thread gets as many rows).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = (rows * keys + BLOCK_ELEMENTS - 1) / BLOCK_ELEMENTS;
  const int64_t wanted_blocks = (target + threads - 1) / threads * threads;
  const int64_t block_rows = std::max<int64_t>(1, (rows + wanted_blocks - 1) / wanted_blocks);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(block_rows * keys * batch, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(summed ? block_rows * keys : 0), total(block_rows);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * block_rows, count = std::min(block_rows, rows - first);
      std::fill(sum.begin(), sum.end(), T(0));
      std::fill(total.begin(), total.end(), T(0));
      for (int64_t b = 0; b < batch; ++b) {
        T* g = dm + (b * rows + first) * keys;
        const T* at = a + (b * rows + first) * keys;
        for (int64_t i = 0; i < count; ++i, g += keys, at += keys) {
          T r = 0;
#pragma omp simd reduction(+ : r)
          for (int64_t k = 0; k < keys; ++k) r += g[k] * at[k];
          total[i] += r;
          if (summed) {
            T* s = sum.data() + i * keys;
#pragma omp simd
            for (int64_t k = 0; k < keys; ++k) s[k] += g[k];
          }
          if (wanted.scores) {
#pragma omp simd
            for (int64_t k = 0; k < keys; ++k) g[k] = at[k] * (g[k] - r);
          }
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = first + i;
        const T* s = sum.data() + i * keys;
        if (wanted.positional) {
          const T scale = T(1) - w[row / queries];
          T* out = dp + row * keys;
#pragma omp simd
          for (int64_t k = 0; k < keys; ++k) out[k] = scale * s[k];
        }
        if (wanted.weight) {
          const T* pr = p + row * keys;
          T d = 0;
#pragma omp simd reduction(+ : d)
          for (int64_t k = 0; k < keys; ++k) d += s[k] * pr[k];
          dw[row] = total[i] - d;
        }
      }
    }
  });
}

}  // namespace

// grad_mixed (B, H, Q, K), attention (B, H, Q, K), positional (H, Q, K), weight (H,): contiguous, one
// floating dtype, CPU.  Overwrites grad_mixed with dS if `scores`.  Returns dP (H, Q, K) if `positional`
// and the dw partials (H, Q) if `weight`, else empty tensors.
std::tuple<at::Tensor, at::Tensor> attend_backward(const at::Tensor& grad_mixed, const at::Tensor& attention,
                                                         const at::Tensor& positional,
                                                         const at::Tensor& weight, bool scores,
                                                         bool positional_grad, bool weight_grad) {
  for (const auto* t : {&grad_mixed, &attention, &positional, &weight}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == grad_mixed.scalar_type() && t->is_contiguous(),
                "attend_backward takes contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(grad_mixed.dim() == 4 && attention.sizes() == grad_mixed.sizes() && positional.dim() == 3 &&
                  positional.sizes() == grad_mixed.sizes().slice(1) && weight.dim() == 1 &&
                  weight.size(0) == grad_mixed.size(1),
              "attend_backward: mismatched sizes");
  const int64_t batch = grad_mixed.size(0), heads = grad_mixed.size(1), queries = grad_mixed.size(2);
  const int64_t keys = grad_mixed.size(3);
  auto dp = positional_grad ? positional.new_empty(positional.sizes()) : positional.new_empty({0});
  auto dw = weight_grad ? weight.new_empty({heads, queries}) : weight.new_empty({0});
  const Wanted wanted{scores, positional_grad, weight_grad};
  AT_DISPATCH_FLOATING_TYPES(grad_mixed.scalar_type(), "attend_backward", [&] {
    map_gradients<scalar_t>(grad_mixed.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(),
                            positional.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            positional_grad ? dp.data_ptr<scalar_t>() : nullptr,
                            weight_grad ? dw.data_ptr<scalar_t>() : nullptr, batch, heads, queries, keys, wanted);
  });
  return {dp, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("content_mix", &content_mix);
  m.def("attend_backward", &attend_backward);
}
