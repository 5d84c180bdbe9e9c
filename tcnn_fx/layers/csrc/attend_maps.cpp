// The elementwise work of ConvAttention2d over its (batch, heads, queries, keys) attention maps, on the CPU:
//
// content_mix (forward, float32): the content scores S = q^T k, their softmax A and the mix
//   M = (1 - w) P + w A with the positional maps, one map row at a time in the cache, written once (M, and A
//   where the caller keeps it for a backward).  Composed from PyTorch operators the scores, the softmax and
//   the mix each walk the maps in memory, and the softmax's exp costs as much as the rest of the three
//   together; here the exp is a polynomial on the vector lanes.
// content_mix_gather (float32): content_mix's maps applied to the values as each task makes them
//   (out[b, c, h, q] = sum_key M[b, h, q, key] values[b, c, key]), M never written (A where kept).
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

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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
constexpr int64_t VECTORS = 3;  // key vectors per tile: ROWS x VECTORS accumulators in registers (with two
                                // vectors, 8 sums, the FMAs waited on each other)
constexpr int64_t TILE = VECTORS * LANES;
constexpr int64_t TASK_ROWS = 16;  // map rows per task of the thread pool
constexpr float LOG2_E = 1.4426950408889634f;

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
// (Filled lane by lane, GCC's AVX2 code built the vector with five inserts.)
inline vf splat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX2__)
  return (vf)_mm256_set1_ps(x);
#else
  vf v;
  for (int64_t lane = 0; lane < LANES; ++lane) v[lane] = x;
  return v;
#endif
}
inline vf maximum(vf a, vf b) { return a > b ? a : b; }

// The first `count` floats at p (0 <= count <= LANES), the other lanes zero; nothing past them is read.
inline vf load_first(const float* p, int64_t count) {
#if defined(__AVX512F__)
  return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), p);
#elif defined(__AVX2__)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return (vf)_mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), lanes));
#else
  vf v = {};
  for (int64_t lane = 0; lane < count; ++lane) v[lane] = p[lane];
  return v;
#endif
}
// v's first `count` lanes to p (0 <= count <= LANES); nothing past them is written.
inline void store_first(float* p, vf v, int64_t count) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << count) - 1), (__m512)v);
#elif defined(__AVX2__)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), lanes), (__m256)v);
#else
  for (int64_t lane = 0; lane < count; ++lane) p[lane] = v[lane];
#endif
}
// Lanes of vector j in a tile `width` keys wide.
inline int64_t lanes_of(int64_t width, int64_t j) { return std::clamp<int64_t>(width - j * LANES, 0, LANES); }

struct MixSizes {
  int64_t dim, keys, q_dim_stride, k_dim_stride;
};

// rows[r * stride + key] = sum_d q[d * q_dim_stride + r] * k[d * k_dim_stride + key] for r < R and the `width`
// keys from k (at most V vectors; PARTIAL where the last is not whole: lanes past the keys are zeros, not read or
// written).
template <int64_t R, int64_t V, bool PARTIAL>
void score_tile(const float* q, const float* k, const MixSizes& n, float* rows, int64_t stride, int64_t width) {
  vf acc[R][V];  // (zeroed by loops: "= {}" was a rep stos over the array on the stack at every tile)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < V; ++j) acc[r][j] = vf{};
  for (int64_t d = 0; d < n.dim; ++d) {
    vf column[V];
    for (int64_t j = 0; j < V; ++j) {
      const float* from = k + d * n.k_dim_stride + j * LANES;
      column[j] = PARTIAL ? load_first(from, lanes_of(width, j)) : load(from);
    }
    for (int64_t r = 0; r < R; ++r) {
      const vf s = splat(q[d * n.q_dim_stride + r]);
      for (int64_t j = 0; j < V; ++j) acc[r][j] += s * column[j];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < V; ++j) {
      float* to = rows + r * stride + j * LANES;
      PARTIAL ? store_first(to, acc[r][j], lanes_of(width, j)) : store(to, acc[r][j]);
    }
}

// One map row, in place: from its scores to mixed = base + w A (and attention = A, unless null).  The keys
// past the last whole vector are one partial vector (lanes past the row: -inf into the max, 0 into the sum).
void softmax_mix_row(float* row, const float* base, float weight, float* attention, int64_t keys) {
  const int64_t whole = keys / LANES * LANES, rest = keys - whole;
  vi lane;
  for (int64_t i = 0; i < LANES; ++i) lane[i] = (int32_t)i;
  const vi in_row = lane < (int32_t)rest;
  const vf none = splat(-INFINITY);
  vf running = none;
  for (int64_t key = 0; key < whole; key += LANES) running = maximum(running, load(row + key));
  if (rest) running = maximum(running, in_row ? load_first(row + whole, rest) : none);
  float top = -INFINITY;
  for (int64_t i = 0; i < LANES; ++i) top = std::max(top, running[i]);
  // s - top first, exactly <= 0 for every score (scaling first could round the largest above zero).
  const vf highest = splat(top), log2_e = splat(LOG2_E);
  vf sums = {};
  for (int64_t key = 0; key < whole; key += LANES) {
    const vf e = exp2_nonpositive<vf, vi>((load(row + key) - highest) * log2_e);
    store(row + key, e);
    sums += e;
  }
  if (rest) {
    const vf e = in_row ? exp2_nonpositive<vf, vi>((load_first(row + whole, rest) - highest) * log2_e) : vf{};
    store_first(row + whole, e, rest);
    sums += e;
  }
  float sum = 0;
  for (int64_t i = 0; i < LANES; ++i) sum += sums[i];
  const vf inv = splat(1.0f / sum), w = splat(weight);
  for (int64_t key = 0; key < whole; key += LANES) {
    const vf a = load(row + key) * inv;
    store(row + key, load(base + key) + w * a);
    if (attention) store(attention + key, a);
  }
  if (rest) {
    const vf a = load_first(row + whole, rest) * inv;
    store_first(row + whole, load_first(base + whole, rest) + w * a, rest);
    if (attention) store_first(attention + whole, a, rest);
  }
}

// score_tile for `width` keys (at most TILE) in as few vectors as hold them (64 keys: 24, 24, then 16 as two
// whole vectors, not three with one masked off).
template <int64_t R, bool PARTIAL>
void score_width(const float* q, const float* k, const MixSizes& n, float* rows, int64_t width) {
  static_assert(VECTORS == 3, "a tile is one to three vectors");
  const int64_t vectors = (width + LANES - 1) / LANES;
  if (vectors == 3) score_tile<R, 3, PARTIAL>(q, k, n, rows, n.keys, width);
  if (vectors == 2) score_tile<R, 2, PARTIAL>(q, k, n, rows, n.keys, width);
  if (vectors == 1) score_tile<R, 1, PARTIAL>(q, k, n, rows, n.keys, width);
}

// The scores of R rows (stride n.keys) over all keys, tile by tile.
template <int64_t R>
void score_rows(const float* q, const float* k, const MixSizes& n, float* rows) {
  for (int64_t key = 0; key < n.keys; key += TILE) {
    const int64_t width = std::min(TILE, n.keys - key);
    if (width % LANES == 0) {
      score_width<R, false>(q, k + key, n, rows + key, width);
    } else {
      score_width<R, true>(q, k + key, n, rows + key, width);
    }
  }
}

// Rows [0, count) of one head's maps from that head's queries qh (advanced to the first row) and keys kh: the
// mixed rows into mixed (four rows' scores written there first, then turned into their mixed rows while in
// the L1 cache), and the attention rows into attention, unless null; base is the first row's positional term.
void map_rows(const float* qh, const float* kh, const MixSizes& n, const float* base, float weight, int64_t count,
              float* mixed, float* attention) {
  const int64_t keys = n.keys;
  for (int64_t row = 0; row < count; row += ROWS) {
    const int64_t rows = std::min(ROWS, count - row);
    if (rows == ROWS) {
      score_rows<ROWS>(qh + row, kh, n, mixed + row * keys);
    } else {
      for (int64_t r = 0; r < rows; ++r) score_rows<1>(qh + row + r, kh, n, mixed + (row + r) * keys);
    }
    for (int64_t r = row; r < row + rows; ++r)
      softmax_mix_row(mixed + r * keys, base + r * keys, weight, attention ? attention + r * keys : nullptr, keys);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward in inference: the maps applied to the values (the gather) as each task's rows are made.
//
// A task's TASK_ROWS map rows, transposed into a panel (keys x PANEL, queries along the lanes), are swept by
// the image's value channels CHANNELS at a time: CHANNELS x PANEL outputs in registers, one broadcast value
// and PANEL / LANES panel vectors per key.  The maps never leave the cache; composed, they are written to
// memory, read back by a batched matrix product and its packing.

constexpr int64_t PANEL = TASK_ROWS;  // queries per panel: one task's rows
constexpr int64_t PANEL_VECTORS = PANEL / LANES;
static_assert(PANEL_VECTORS == 1 || PANEL_VECTORS == 2, "a panel row is one or two vectors");
constexpr int64_t CHANNELS = 6;  // value channels per register tile: CHANNELS x PANEL_VECTORS accumulators

// panel[key * PANEL + lane] = block[lane * keys + key]: block holds PANEL rows of keys (rows past the task's
// own are zeros).
void transpose_block(const float* block, int64_t keys, float* panel) {
  int64_t key = 0;
#if defined(__AVX2__)
  for (; key + 8 <= keys; key += 8) {
    for (int64_t lane0 = 0; lane0 < PANEL; lane0 += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(block + (lane0 + i) * keys + key);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* out = panel + key * PANEL + lane0;
      _mm256_storeu_ps(out + 0 * PANEL, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(out + 1 * PANEL, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(out + 2 * PANEL, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(out + 3 * PANEL, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(out + 4 * PANEL, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(out + 5 * PANEL, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(out + 6 * PANEL, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(out + 7 * PANEL, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
#endif
  for (; key < keys; ++key)
    for (int64_t lane = 0; lane < PANEL; ++lane) panel[key * PANEL + lane] = block[lane * keys + key];
}

// out[r * out_row + lane] = sum_key values[r * value_row + key] * panel[key * PANEL + lane] for r < R and the
// first `used` lanes, the keys added in order by fused multiply-adds (so one-hot maps gather exactly).  The
// accumulators are named variables: held in an array, GCC kept them on the stack, storing all twelve at every key.
template <int64_t R>
void gather_tile(const float* values, int64_t value_row, const float* panel, int64_t keys, float* out,
                 int64_t out_row, int64_t used) {
  static_assert(R >= 1 && R <= CHANNELS, "a tile has 1 to CHANNELS rows");
  vf a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {}, a40 = {}, a41 = {}, a50 = {},
     a51 = {};
  for (int64_t key = 0; key < keys; ++key) {
    const vf p0 = load(panel + key * PANEL);
    const vf p1 = PANEL_VECTORS > 1 ? load(panel + key * PANEL + LANES) : p0;
#define TCNN_FX_GATHER_STEP(r)                          \
  if (R > r) {                                          \
    const vf s = splat(values[r * value_row + key]);    \
    a##r##0 += s * p0;                                  \
    if (PANEL_VECTORS > 1) a##r##1 += s * p1;           \
  }
    TCNN_FX_GATHER_STEP(0) TCNN_FX_GATHER_STEP(1) TCNN_FX_GATHER_STEP(2)
    TCNN_FX_GATHER_STEP(3) TCNN_FX_GATHER_STEP(4) TCNN_FX_GATHER_STEP(5)
#undef TCNN_FX_GATHER_STEP
  }
  const vf sums[CHANNELS][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  for (int64_t r = 0; r < R; ++r) {
    if (used == PANEL) {  // (std::copy here was a call to memmove per row: a tenth of the kernel's time)
      for (int64_t j = 0; j < PANEL_VECTORS; ++j) store(out + r * out_row + j * LANES, sums[r][j]);
      continue;
    }
    float row[PANEL];
    for (int64_t j = 0; j < PANEL_VECTORS; ++j) store(row + j * LANES, sums[r][j]);
    for (int64_t lane = 0; lane < used; ++lane) out[r * out_row + lane] = row[lane];
  }
}

// Every value channel's gather from one panel: tiles of CHANNELS rows, then of 4, 2 and 1.
void gather_panel(const float* values, int64_t value_row, int64_t channels, const float* panel, int64_t keys,
                  float* out, int64_t out_row, int64_t used) {
  int64_t c = 0;
  for (; c + CHANNELS <= channels; c += CHANNELS)
    gather_tile<CHANNELS>(values + c * value_row, value_row, panel, keys, out + c * out_row, out_row, used);
  if (channels - c >= 4) {
    gather_tile<4>(values + c * value_row, value_row, panel, keys, out + c * out_row, out_row, used);
    c += 4;
  }
  if (channels - c >= 2) {
    gather_tile<2>(values + c * value_row, value_row, panel, keys, out + c * out_row, out_row, used);
    c += 2;
  }
  if (channels - c >= 1) gather_tile<1>(values + c * value_row, value_row, panel, keys, out + c * out_row, out_row, used);
}

// Checks the operands the forward entry points share; their sizes for score_rows.
MixSizes forward_sizes(const char* name, const at::Tensor& q, const at::Tensor& k, const at::Tensor& base,
                       const at::Tensor& weight) {
  for (const auto* t : {&q, &k, &base, &weight})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, name, " takes float32 CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(2) == k.size(2) && q.stride(3) == 1 && k.stride(3) == 1,
              name, ": q and k must be (B, H, d, pixels) with unit stride along the pixels");
  const int64_t heads = q.size(1), queries = q.size(3), keys = k.size(3);
  TORCH_CHECK(base.is_contiguous() && base.dim() == 3 && base.size(0) == heads && base.size(1) == queries &&
                  base.size(2) == keys && weight.is_contiguous() && weight.numel() == heads,
              name, ": base must be contiguous (H, Q, K) and weight (H,)");
  return MixSizes{q.size(2), keys, q.stride(2), k.stride(2)};
}

// The softmax's destination where a caller keeps it, else null: attention must be empty (not kept) or
// contiguous (B, H, Q, K), the maps' sizes.
float* kept_attention(const char* name, const at::Tensor& attention, const at::Tensor& q, const at::Tensor& k) {
  if (attention.numel() == 0) return nullptr;
  TORCH_CHECK(attention.is_contiguous() &&
                  attention.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(3), k.size(3)}),
              name, ": attention must be empty or contiguous (B, H, Q, K)");
  return attention.data_ptr<float>();
}

}  // namespace

// q (B, H, d, Q) and k (B, H, d, K), unit stride along the pixels, queries already scaled by 1/sqrt(d);
// base (H, Q, K): (1 - w) times the positional maps; weight (H,); mixed and attention (B, H, Q, K), contiguous
// (attention may be empty: not written).  Writes M into mixed and A into attention; float32 CPU tensors.
void content_mix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& base,
                 const at::Tensor& weight, const at::Tensor& mixed, const at::Tensor& attention) {
  const MixSizes n = forward_sizes("content_mix", q, k, base, weight);
  for (const auto* t : {&mixed, &attention})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "content_mix takes float32 CPU tensors");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(3), keys = k.size(3);
  TORCH_CHECK(mixed.is_contiguous() && mixed.dim() == 4 && mixed.size(0) == batch && mixed.size(1) == heads &&
                  mixed.size(2) == queries && mixed.size(3) == keys,
              "content_mix: mixed must be contiguous (B, H, Q, K)");
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k.data_ptr<float>();
  const float* base_ptr = base.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  float* m_ptr = mixed.data_ptr<float>();
  float* a_ptr = kept_attention("content_mix", attention, q, k);
  const int64_t blocks = (queries + TASK_ROWS - 1) / TASK_ROWS;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(TASK_ROWS * keys, 1));
  at::parallel_for(0, batch * heads * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, h = bh % heads, b = bh / heads;
      const int64_t first = task % blocks * TASK_ROWS, last = std::min(first + TASK_ROWS, queries);
      const int64_t offset = (bh * queries + first) * keys;
      map_rows(q_ptr + b * q.stride(0) + h * q.stride(1) + first, k_ptr + b * k.stride(0) + h * k.stride(1), n,
               base_ptr + (h * queries + first) * keys, w_ptr[h], last - first, m_ptr + offset,
               a_ptr ? a_ptr + offset : nullptr);
    }
  });
}

// content_mix's maps applied to the values: out[b, c, h, q] = sum_key M[b, h, q, key] * values[b, c, key],
// without writing M; A into attention unless it is empty (a training forward keeps it for its backward).
// values (B, C, K) with unit stride along the keys; out (B, C, H, Q), contiguous; the other operands as
// content_mix's.
void content_mix_gather(const at::Tensor& q, const at::Tensor& k, const at::Tensor& base, const at::Tensor& weight,
                        const at::Tensor& values, const at::Tensor& out, const at::Tensor& attention) {
  const MixSizes n = forward_sizes("content_mix_gather", q, k, base, weight);
  for (const auto* t : {&values, &out, &attention})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "content_mix_gather takes float32 CPU tensors");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(3), keys = k.size(3);
  TORCH_CHECK(values.dim() == 3 && values.size(0) == batch && values.size(2) == keys && values.stride(2) == 1,
              "content_mix_gather: values must be (B, C, K) with unit stride along the keys");
  const int64_t channels = values.size(1);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 4 && out.size(0) == batch && out.size(1) == channels &&
                  out.size(2) == heads && out.size(3) == queries,
              "content_mix_gather: out must be contiguous (B, C, H, Q)");
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k.data_ptr<float>();
  const float* base_ptr = base.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  const float* v_ptr = values.data_ptr<float>();
  float* o_ptr = out.data_ptr<float>();
  float* a_ptr = kept_attention("content_mix_gather", attention, q, k);
  const int64_t blocks = (queries + TASK_ROWS - 1) / TASK_ROWS;
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(PANEL * keys), panel(keys * PANEL);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, h = bh % heads, b = bh / heads;
      const int64_t first = task % blocks * TASK_ROWS, count = std::min(TASK_ROWS, queries - first);
      map_rows(q_ptr + b * q.stride(0) + h * q.stride(1) + first, k_ptr + b * k.stride(0) + h * k.stride(1), n,
               base_ptr + (h * queries + first) * keys, w_ptr[h], count, block.data(),
               a_ptr ? a_ptr + (bh * queries + first) * keys : nullptr);
      std::fill(block.begin() + count * keys, block.end(), 0.0f);
      transpose_block(block.data(), keys, panel.data());
      gather_panel(v_ptr + b * values.stride(0), values.stride(1), channels, panel.data(), keys,
                   o_ptr + ((b * channels) * heads + h) * queries + first, heads * queries, count);
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
  m.def("content_mix_gather", &content_mix_gather);
  m.def("attend_backward", &attend_backward);
}
