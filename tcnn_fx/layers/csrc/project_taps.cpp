// The output projection of ConvAttention2d on the CPU, summed in the order of oneDNN's direct convolution.
//
// The layer's heads gather every input channel at every kernel tap: taps[b, c, h, q] (image b, channel c,
// head = tap h, output pixel q).  The projection is the convolution's own arithmetic on them:
//   out[b, o, q] = bias[o] + sum_{c in o's group, h} weight[o, c, h] * taps[b, c, h, q]
// and it reproduces the convolution to the last bit (where the attention maps are one-hot, at
// initialisation) when every output is summed in the order the convolution sums it.  oneDNN's direct
// convolution on AVX2 (the one PyTorch runs for float32 convolutions on such processors) starts each output
// at its bias and adds, with one fused multiply-add each, the products of one block of 8 input channels at a
// time, kernel taps outer, channels inner: the caller lists the reduction in that order (``channels`` and
// ``taps``, and the packed weights), and this kernel adds the products in list order.
//
// Handed to oneDNN as a strided convolution (what the layer did before), the taps are reordered into
// oneDNN's blocked layout first: a copy nine times the convolution's input, made on every call.  Here each
// task copies panels of the taps (the reduction's rows, 16 output pixels wide; up to four, as many as fit
// the L2 cache together) into the cache once and sweeps its output channels over them, 6 at a time in
// registers, each block of 6 channels' weights loaded once for all the task's panels.
#include "binding.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS = 6;      // output channels per register tile (ROWS x 2 accumulators of 8 lanes)
constexpr int64_t COLUMNS = 16;  // output pixels per register tile and per panel row
// Tiles per task at most: each block of weights is loaded once for all of them, as long as their panels
// (reduction x 16 floats each) fit PANEL_BYTES together; past that, one (the panels would leave the L2 cache).
constexpr int64_t MAX_TILES = 4;
constexpr int64_t PANEL_BYTES = 160 * 1024;

// A tile's columns are 16 consecutive output pixels of the batch, images one after another, so a map whose
// pixel count is not a multiple of 16 (7x7: 49) wastes no lanes but the batch's last few.  Each piece is a
// run of the tile's columns within one image: columns [lane, lane + count) are pixels [pixel, pixel + count).
struct Piece {
  int64_t image, pixel, lane, count;
};
struct Tile {
  Piece pieces[COLUMNS];
  int64_t size, cols;
};

Tile tile_at(int64_t first, int64_t total, int64_t pixels) {
  Tile tile;
  tile.size = 0;
  tile.cols = std::min(COLUMNS, total - first);
  for (int64_t j = first; j < first + tile.cols;) {
    const int64_t pixel = j % pixels, count = std::min(pixels - pixel, first + tile.cols - j);
    tile.pieces[tile.size++] = {j / pixels, pixel, j - first, count};
    j += count;
  }
  return tile;
}

// Where the layout puts things: the taps' image stride, the reduction's row offsets within an image's group,
// and the output's channels and pixels.
struct Layout {
  int64_t image_stride;
  const int64_t* offsets;
  int64_t out_channels, pixels;
};

#if defined(__AVX2__) && defined(__FMA__)

inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// Lanes [lo, hi) of the 8 starting at lane `base`.
inline __m256i lanes_in(int64_t lo, int64_t hi, int64_t base) {
  return _mm256_andnot_si256(lanes_below(lo - base), lanes_below(hi - base));
}

// Copies the tile's columns of every reduction row into the panel (reduction, 16), zeros past its columns.
void copy_panel(const float* group_taps, const Layout& at, int64_t reduction, const Tile& tile, float* panel) {
  if (tile.size == 1 && tile.cols == COLUMNS) {
    const float* source = group_taps + tile.pieces[0].image * at.image_stride + tile.pieces[0].pixel;
    for (int64_t k = 0; k < reduction; ++k) {
      _mm256_store_ps(panel + k * COLUMNS, _mm256_loadu_ps(source + at.offsets[k]));
      _mm256_store_ps(panel + k * COLUMNS + 8, _mm256_loadu_ps(source + at.offsets[k] + 8));
    }
    return;
  }
  __m256i low[COLUMNS], high[COLUMNS];
  const float* sources[COLUMNS];
  for (int64_t i = 0; i < tile.size; ++i) {
    const Piece& piece = tile.pieces[i];
    low[i] = lanes_in(piece.lane, piece.lane + piece.count, 0);
    high[i] = lanes_in(piece.lane, piece.lane + piece.count, 8);
    // Lane l of the piece reads pixel (pixel - lane + l): masked lanes read nothing.
    sources[i] = group_taps + piece.image * at.image_stride + piece.pixel - piece.lane;
  }
  for (int64_t k = 0; k < reduction; ++k) {
    __m256 v0 = _mm256_setzero_ps(), v1 = v0;
    for (int64_t i = 0; i < tile.size; ++i) {
      const float* source = sources[i] + at.offsets[k];
      v0 = _mm256_blendv_ps(v0, _mm256_maskload_ps(source, low[i]), _mm256_castsi256_ps(low[i]));
      v1 = _mm256_blendv_ps(v1, _mm256_maskload_ps(source + 8, high[i]), _mm256_castsi256_ps(high[i]));
    }
    _mm256_store_ps(panel + k * COLUMNS, v0);
    _mm256_store_ps(panel + k * COLUMNS + 8, v1);
  }
}

// Output rows o0 + r (r < valid) of the tile's columns, from the panel and the packed weights (reduction,
// ROWS); each sum starts at the bias.  WIDE: the tile has more than 8 columns.
template <bool WIDE>
inline void tile_rows(const float* panel, int64_t reduction, const float* weight, const float* bias, int64_t valid,
                      float* result, int64_t o0, const Layout& at, const Tile& tile) {
#define TCNN_FX_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define TCNN_FX_INIT(r) \
  __m256 a##r##0 = _mm256_set1_ps(bias ? bias[std::min<int64_t>(r, valid - 1)] : 0.f), a##r##1 = a##r##0;
  TCNN_FX_ROWS(TCNN_FX_INIT)
  for (int64_t k = 0; k < reduction; ++k) {
    const __m256 v0 = _mm256_load_ps(panel + k * COLUMNS);
    const __m256 v1 = WIDE ? _mm256_load_ps(panel + k * COLUMNS + 8) : v0;
    const float* w = weight + k * ROWS;
#define TCNN_FX_STEP(r)                                  \
  {                                                      \
    const __m256 s = _mm256_broadcast_ss(w + r);         \
    a##r##0 = _mm256_fmadd_ps(s, v0, a##r##0);           \
    if (WIDE) a##r##1 = _mm256_fmadd_ps(s, v1, a##r##1); \
  }
    TCNN_FX_ROWS(TCNN_FX_STEP)
  }
  for (int64_t i = 0; i < tile.size; ++i) {
    const Piece& piece = tile.pieces[i];
    float* y = result + (piece.image * at.out_channels + o0) * at.pixels + piece.pixel - piece.lane;
    const bool whole = piece.count == COLUMNS;
    const __m256i low = lanes_in(piece.lane, piece.lane + piece.count, 0);
    const __m256i high = lanes_in(piece.lane, piece.lane + piece.count, 8);
#define TCNN_FX_STORE(r)                                                     \
  if (r < valid) {                                                           \
    float* row = y + r * at.pixels;                                          \
    if (whole) {                                                             \
      _mm256_storeu_ps(row, a##r##0);                                        \
      _mm256_storeu_ps(row + 8, a##r##1);                                    \
    } else {                                                                 \
      _mm256_maskstore_ps(row, low, a##r##0);                                \
      if (WIDE) _mm256_maskstore_ps(row + 8, high, a##r##1);                 \
    }                                                                        \
  }
    TCNN_FX_ROWS(TCNN_FX_STORE)
  }
#undef TCNN_FX_ROWS
#undef TCNN_FX_INIT
#undef TCNN_FX_STEP
#undef TCNN_FX_STORE
}

void sweep(const float* panel, int64_t reduction, const float* weight, const float* bias, int64_t valid,
           float* result, int64_t o0, const Layout& at, const Tile& tile) {
  if (tile.cols > 8)
    tile_rows<true>(panel, reduction, weight, bias, valid, result, o0, at, tile);
  else
    tile_rows<false>(panel, reduction, weight, bias, valid, result, o0, at, tile);
}

#else  // portable build: the same order, one fused multiply-add at a time

void copy_panel(const float* group_taps, const Layout& at, int64_t reduction, const Tile& tile, float* panel) {
  for (int64_t i = 0; i < tile.size; ++i) {
    const Piece& piece = tile.pieces[i];
    const float* source = group_taps + piece.image * at.image_stride + piece.pixel;
    for (int64_t k = 0; k < reduction; ++k)
      for (int64_t j = 0; j < piece.count; ++j) panel[k * COLUMNS + piece.lane + j] = source[at.offsets[k] + j];
  }
}

void sweep(const float* panel, int64_t reduction, const float* weight, const float* bias, int64_t valid,
           float* result, int64_t o0, const Layout& at, const Tile& tile) {
  for (int64_t i = 0; i < tile.size; ++i) {
    const Piece& piece = tile.pieces[i];
    for (int64_t r = 0; r < valid; ++r)
      for (int64_t j = 0; j < piece.count; ++j) {
        float acc = bias ? bias[r] : 0.f;
        for (int64_t k = 0; k < reduction; ++k)
          acc = std::fma(weight[k * ROWS + r], panel[k * COLUMNS + piece.lane + j], acc);
        result[(piece.image * at.out_channels + o0 + r) * at.pixels + piece.pixel + j] = acc;
      }
  }
}

#endif

}  // namespace

// taps (B, C, H, Q) float32 with unit stride along Q (other strides free); packed (G, row blocks, K, ROWS):
// each group's weights in reduction order, zero rows past the group's outputs; channels and tap_index (K,)
// int64: the reduction order (channel within the group, tap); bias (O,) or empty; out (B, O, Q) contiguous;
// scratch: at least threads x 4 x K x 16 floats.
void project_taps(const at::Tensor& taps, const at::Tensor& packed, const at::Tensor& channels,
                  const at::Tensor& tap_index, const at::Tensor& bias, at::Tensor out,
                  at::Tensor scratch) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&taps, &packed, &bias, &out, &scratch})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "project_taps takes float32 CPU tensors");
  TORCH_CHECK(taps.dim() == 4 && taps.stride(3) == 1, "project_taps: taps must be (B, C, H, Q), unit stride along Q");
  TORCH_CHECK(packed.dim() == 4 && packed.size(3) == ROWS && packed.is_contiguous(),
              "project_taps: packed weights must be contiguous (G, blocks, K, 6)");
  const int64_t groups = packed.size(0), row_blocks = packed.size(1), reduction = packed.size(2);
  TORCH_CHECK(taps.size(1) % groups == 0 && reduction == taps.size(1) / groups * taps.size(2),
              "project_taps: the packed weights do not match the taps' channels and heads");
  TORCH_CHECK(channels.scalar_type() == at::kLong && tap_index.scalar_type() == at::kLong &&
                  channels.numel() == reduction && tap_index.numel() == reduction && channels.is_contiguous() &&
                  tap_index.is_contiguous(),
              "project_taps: channels and taps must be contiguous int64 of the reduction's length");
  const int64_t images = taps.size(0), pixels = taps.size(3), out_channels = out.size(1);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == images && out.size(2) == pixels &&
                  out_channels % groups == 0 && (out_channels / groups + ROWS - 1) / ROWS == row_blocks,
              "project_taps: out must be contiguous (B, O, Q) matching the packed weights");
  TORCH_CHECK(bias.numel() == 0 || (bias.is_contiguous() && bias.numel() == out_channels), "project_taps: bias (O,)");
  const int64_t threads = at::get_num_threads();
  TORCH_CHECK(scratch.is_contiguous() && scratch.numel() >= threads * MAX_TILES * reduction * COLUMNS,
              "project_taps: scratch too small");

  const int64_t per_group = out_channels / groups, group_channels = taps.size(1) / groups;
  const int64_t total = images * pixels, tiles = (total + COLUMNS - 1) / COLUMNS;
  // Offsets of the reduction's rows within one group of one image.
  std::vector<int64_t> offsets(reduction);
  const int64_t* c = channels.data_ptr<int64_t>();
  const int64_t* h = tap_index.data_ptr<int64_t>();
  for (int64_t k = 0; k < reduction; ++k) offsets[k] = c[k] * taps.stride(1) + h[k] * taps.stride(2);
  const Layout at{taps.stride(0), offsets.data(), out_channels, pixels};
  // Tasks: (group, run of tiles, chunk of output row blocks); the chunks only where groups and runs give the
  // threads too few tasks.
  const int64_t per_task = std::clamp<int64_t>(PANEL_BYTES / (reduction * COLUMNS * 4), 1, MAX_TILES);
  const int64_t runs = (tiles + per_task - 1) / per_task;
  int64_t chunks = 1;
  while (groups * runs * chunks < 4 * threads && chunks < row_blocks) ++chunks;
  const int64_t blocks_per_chunk = (row_blocks + chunks - 1) / chunks;

  const float* source = taps.data_ptr<float>();
  const float* weights = packed.data_ptr<float>();
  const float* biases = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* result = out.data_ptr<float>();
  float* panels_memory = scratch.data_ptr<float>();
  at::parallel_for(0, groups * runs * chunks, 1, [&](int64_t begin, int64_t end) {
    float* panels = panels_memory + at::get_thread_num() * MAX_TILES * reduction * COLUMNS;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, run = (task / chunks) % runs, group = task / (chunks * runs);
      const int64_t count = std::min(per_task, tiles - run * per_task);
      Tile run_tiles[MAX_TILES];
      for (int64_t t = 0; t < count; ++t) {
        run_tiles[t] = tile_at((run * per_task + t) * COLUMNS, total, pixels);
        copy_panel(source + group * group_channels * taps.stride(1), at, reduction, run_tiles[t],
                   panels + t * reduction * COLUMNS);
      }
      const int64_t last = std::min(row_blocks, (chunk + 1) * blocks_per_chunk);
      for (int64_t rows = chunk * blocks_per_chunk; rows < last; ++rows) {
        const int64_t o0 = group * per_group + rows * ROWS;
        const float* w = weights + (group * row_blocks + rows) * reduction * ROWS;
        for (int64_t t = 0; t < count; ++t)
          sweep(panels + t * reduction * COLUMNS, reduction, w, biases ? biases + o0 : nullptr,
                std::min(ROWS, per_group - rows * ROWS), result, o0, at, run_tiles[t]);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("project_taps", &project_taps); }
