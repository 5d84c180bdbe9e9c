// The elementwise part of ConvAttention2d's training backward (tcnn_fx/layers/attention_backward.py)
// in one pass over the (batch, heads, queries, keys) maps, float32 or float64.
//
// From dM, the gradient of the mixed maps M = (1 - w) P + w A (A the content softmax, P the
// positional maps, w the per-head content weights), and A:
//   r            = sum_k dM * A                 (per map row: the softmax backward's row term)
//   dS           = A (dM - r)                   (written over dM; the caller scales by w later)
//   dP           = (1 - w) sum_b dM
//   dw partials  = sum_b r - sum_k (sum_b dM) P (one per (head, query) row; summed per head by the caller)
// Composed from PyTorch operators these walk the maps about eight times (reads and writes); here
// dM and A are read once and dS written once.  The work is split by blocks of (head, query) rows,
// each block's batch sum of dM kept in the L1 cache while the images stream past, so every row's
// batch sum and partials are finished by one thread and need no reduction across threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

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
std::tuple<torch::Tensor, torch::Tensor> attend_backward(const torch::Tensor& grad_mixed, const torch::Tensor& attention,
                                                         const torch::Tensor& positional,
                                                         const torch::Tensor& weight, bool scores,
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
  auto dp = positional_grad ? torch::empty_like(positional) : torch::empty({0}, positional.options());
  auto dw = weight_grad ? torch::empty({heads, queries}, weight.options()) : torch::empty({0}, weight.options());
  const Wanted wanted{scores, positional_grad, weight_grad};
  AT_DISPATCH_FLOATING_TYPES(grad_mixed.scalar_type(), "attend_backward", [&] {
    map_gradients<scalar_t>(grad_mixed.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(),
                            positional.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            positional_grad ? dp.data_ptr<scalar_t>() : nullptr,
                            weight_grad ? dw.data_ptr<scalar_t>() : nullptr, batch, heads, queries, keys, wanted);
  });
  return {dp, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("attend_backward", &attend_backward); }
