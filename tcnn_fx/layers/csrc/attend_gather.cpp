// Fused content attention and gather for ConvAttention2d inference on the CPU (float32).
//
// For every image, head and block of queries: the content scores q . k, their softmax over the
// keys (base 2: log2(e) is folded into the queries), the mix with the head's positional map, and
// the mixed map applied to every value channel, without writing the maps to memory.  Queries run
// along the vector lanes throughout, so the softmax needs no horizontal reductions and the
// gather stores whole rows of queries.
#include "binding.h"

#include "exp2.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int64_t LANES = 16;
constexpr int64_t MAX_VECTORS = 3;
constexpr int64_t BLOCK = MAX_VECTORS * LANES;  // queries per block (tiles of 8 rows x 3 vectors: 24 accumulators)
constexpr int64_t KEY_TILE = 8;
constexpr int64_t CHANNEL_TILE = 8;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// out[r * out_stride + lane] = sum_i a[r * a_row + i * a_inner] * cols[i * BLOCK + lane]
// for r < R and the first `used` lanes of NV vectors.
template <int64_t R, int64_t NV>
inline void product_tile(const float* a, int64_t a_row, int64_t a_inner, int64_t depth, const float* cols,
                         float* out, int64_t out_stride, int64_t used) {
  vf acc[R][NV] = {};
  for (int64_t i = 0; i < depth; ++i) {
    vf col[NV];
    for (int64_t j = 0; j < NV; ++j) col[j] = load(cols + i * BLOCK + j * LANES);
    for (int64_t r = 0; r < R; ++r) {
      const float s = a[r * a_row + i * a_inner];
      for (int64_t j = 0; j < NV; ++j) acc[r][j] += s * col[j];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float row[BLOCK];
    for (int64_t j = 0; j < NV; ++j) store(row + j * LANES, acc[r][j]);
    std::memcpy(out + r * out_stride, row, used * sizeof(float));
  }
}

// All rows of a product: tiles of R rows, then single rows.
template <int64_t R, int64_t NV>
inline void product(int64_t rows, const float* a, int64_t a_row, int64_t a_inner, int64_t depth, const float* cols,
                    float* out, int64_t out_stride, int64_t used) {
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    product_tile<R, NV>(a + r * a_row, a_row, a_inner, depth, cols, out + r * out_stride, out_stride, used);
  for (; r < rows; ++r)
    product_tile<1, NV>(a + r * a_row, a_row, a_inner, depth, cols, out + r * out_stride, out_stride, used);
}

struct Head {
  const float* q;       // [dim][queries], row stride q_stride
  const float* k;       // [dim][keys], row stride k_stride
  const float* values;  // [channels][keys], row stride v_stride
  const float* base;    // [keys][padded queries]: (1 - w) * positional map, transposed
  float weight;         // w, the content weight
  float* out;           // [channels][...], row stride out_stride
};

struct Sizes {
  int64_t dim, queries, keys, channels, q_stride, q_pixel, k_stride, k_pixel, v_stride, base_stride, out_stride;
};

template <int64_t NV>
void attend_block(const Head& head, const Sizes& n, int64_t q0, int64_t used, float* queries, float* maps) {
  for (int64_t d = 0; d < n.dim; ++d) {
    const float* row = head.q + d * n.q_stride + q0 * n.q_pixel;
    for (int64_t lane = 0; lane < BLOCK; ++lane) queries[d * BLOCK + lane] = lane < used ? row[lane * n.q_pixel] : 0.0f;
  }
  // maps[key][lane] = sum_d k[d][key] * queries[d][lane]
  product<KEY_TILE, NV>(n.keys, head.k, n.k_pixel, n.k_stride, n.dim, queries, maps, BLOCK, NV * LANES);
  const vf weight = splat(head.weight);
  for (int64_t j = 0; j < NV; ++j) {
    float* column = maps + j * LANES;
    vf top = load(column);
    for (int64_t key = 1; key < n.keys; ++key) {
      const vf s = load(column + key * BLOCK);
      top = top > s ? top : s;
    }
    vf sum = {};
    for (int64_t key = 0; key < n.keys; ++key) {
      const vf e = exp2_nonpositive<vf, vi>(load(column + key * BLOCK) - top);
      store(column + key * BLOCK, e);
      sum += e;
    }
    const vf scale = weight / sum;
    const float* base = head.base + q0 + j * LANES;
    for (int64_t key = 0; key < n.keys; ++key)
      store(column + key * BLOCK, load(base + key * n.base_stride) + scale * load(column + key * BLOCK));
  }
  // out[c][q0 + lane] = sum_key values[c][key] * maps[key][lane]
  product<CHANNEL_TILE, NV>(n.channels, head.values, n.v_stride, 1, n.keys, maps, head.out + q0, n.out_stride, used);
}

}  // namespace

// q: (B, heads * dim, Q), k: (B, heads * dim, K), values: (B, C, K), each with unit stride along pixels
// and rows of its pixels; base_t: (heads, K, Qpad), Qpad a multiple of 48 >= Q; weight: (heads,).
// Returns (C, B * heads, Q): row c, column (b * heads + h) * Q + q is head h's attention for query q
// of image b applied to channel c.
at::Tensor attend_gather(const at::Tensor& q, const at::Tensor& k, const at::Tensor& values,
                            const at::Tensor& base_t, const at::Tensor& weight, int64_t heads) {
  for (const auto* t : {&q, &k, &values, &base_t, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "attend_gather takes float32 CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && values.dim() == 3 && base_t.dim() == 3, "attend_gather: bad ranks");
  const int64_t batch = q.size(0), dim = q.size(1) / heads, queries = q.size(2), keys = k.size(2);
  const int64_t channels = values.size(1), padded = base_t.size(2);
  TORCH_CHECK(values.stride(2) == 1 && base_t.is_contiguous() && weight.is_contiguous(),
              "attend_gather: values, base_t and weight must have contiguous rows");
  TORCH_CHECK(padded % BLOCK == 0 && padded >= queries && base_t.size(1) == keys && base_t.size(0) == heads &&
                  values.size(2) == keys && k.size(1) == heads * dim, "attend_gather: mismatched sizes");
  auto out = q.new_empty({channels, batch * heads, queries});
  const Sizes n{dim,           queries,     keys,        channels,          q.stride(1), q.stride(2),
                k.stride(1),   k.stride(2), values.stride(1), padded, batch * heads * queries};
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k.data_ptr<float>();
  const float* v_ptr = values.data_ptr<float>();
  const float* base_ptr = base_t.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block_queries(dim * BLOCK), maps(keys * BLOCK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const Head head{q_ptr + b * q.stride(0) + h * dim * n.q_stride,
                      k_ptr + b * k.stride(0) + h * dim * n.k_stride,
                      v_ptr + b * values.stride(0),
                      base_ptr + h * keys * padded,
                      w_ptr[h],
                      out_ptr + task * queries};
      for (int64_t q0 = 0; q0 < queries; q0 += BLOCK) {
        const int64_t used = std::min(BLOCK, queries - q0);
        switch ((used + LANES - 1) / LANES) {  // vectors this block needs
          case 3: attend_block<3>(head, n, q0, used, block_queries.data(), maps.data()); break;
          case 2: attend_block<2>(head, n, q0, used, block_queries.data(), maps.data()); break;
          default: attend_block<1>(head, n, q0, used, block_queries.data(), maps.data());
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("attend_gather", &attend_gather); }
