// Winograd tile transforms for XLA:CPU, as XLA FFI custom calls (see smsanet_jax/native.py).
//
// Every transform that ops.py's Winograd convolution needs is one of two shapes, with a small
// constant matrix M applied along both spatial axes of each tile:
//
//   windows_to_planes: plane (b, a) of tile (p, q) = sum_ij M[a][i] M[b][j] x[s*p + i, s*q + j]
//     (the input transform with M = B^T, and the output transform's adjoint with M = A);
//   planes_to_pixels: the transpose, summed where windows overlap
//     (the output transform with M = A^T, and the input transform's adjoint with M = B).
//
// Planes are ordered (column b, row a): [planes, N * P * Q tiles, C]; pixels are [N, H, W, C].
// XLA's own fusions of these transforms take two passes (rows, then columns) over a 4x expanded
// array; here each tile is done in cache, in one pass over memory. Both are memory-bound, so the
// work is split over XLA's intra-op threads by rows of tiles (or of pixels): no two threads write
// the same memory, and the sums are in the same order as the single-threaded ones.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One non-zero of the tile map kron(M, M): destination index, source index, coefficient.
struct Term {
  int64_t dst;
  int64_t src;
  float coefficient;
};

// Runs body(unit) for unit in [0, units), spread over the pool's threads and the caller's.
// Units are claimed from a shared counter, and the caller waits for completed units rather than
// for helper tasks, so a helper that starts late finds nothing to do and cannot deadlock.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t units, const Body& body) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, units, &body] {
    for (int64_t unit; (unit = progress->next.fetch_add(1)) < units;) {
      body(unit);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  // A helper may outlive this call, but only once the counter is exhausted, and then it touches
  // nothing but `progress`: every unit it claimed completed before the caller returned.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < units) {
  }
}

// The tile map's non-zeros: plane (b, a) <- window pixel (i, j) with M[a][i] * M[b][j], for M of
// shape [planes_per_side, window] given row-major.
std::vector<Term> TileTerms(ffi::Span<const float> matrix, int64_t window) {
  const int64_t side = static_cast<int64_t>(matrix.size()) / window;
  std::vector<Term> terms;
  for (int64_t b = 0; b < side; ++b)
    for (int64_t a = 0; a < side; ++a)
      for (int64_t i = 0; i < window; ++i)
        for (int64_t j = 0; j < window; ++j) {
          const float coefficient = matrix[a * window + i] * matrix[b * window + j];
          if (coefficient != 0) terms.push_back({b * side + a, i * window + j, coefficient});
        }
  return terms;
}

ffi::Error CheckShapes(int64_t planes, int64_t tiles, int64_t channels, ffi::Span<const int64_t> pixels,
                       int64_t side, int64_t window, int64_t stride, int64_t* rows, int64_t* cols) {
  if (pixels.size() != 4 || pixels[3] != channels || window < 1 || stride < 1 || side * side != planes ||
      (pixels[1] - window) % stride != 0 || (pixels[2] - window) % stride != 0) {
    return ffi::Error::InvalidArgument("winograd transform: inconsistent shapes or attributes");
  }
  *rows = (pixels[1] - window) / stride + 1;
  *cols = (pixels[2] - window) / stride + 1;
  if (pixels[0] * *rows * *cols != tiles) {
    return ffi::Error::InvalidArgument("winograd transform: tile count does not match the image");
  }
  return ffi::Error::Success();
}

ffi::Error WindowsToPlanes(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Span<const float> matrix,
                           int64_t window, int64_t stride, ffi::ResultBuffer<ffi::F32> planes) {
  const auto out_dims = planes->dimensions();
  const int64_t side = static_cast<int64_t>(matrix.size()) / window;
  int64_t rows, cols;
  if (ffi::Error error = CheckShapes(out_dims[0], out_dims[1], out_dims[2], x.dimensions(), side, window,
                                     stride, &rows, &cols);
      error.failure()) {
    return error;
  }
  const int64_t height = x.dimensions()[1], width = x.dimensions()[2], channels = x.dimensions()[3];
  const int64_t tiles = out_dims[1];
  std::vector<Term> terms = TileTerms(matrix, window);
  for (Term& term : terms) {  // Window pixel (i, j) -> its offset from the tile's first pixel.
    term.src = (term.src / window * width + term.src % window) * channels;
  }
  const float* in = x.typed_data();
  float* out = planes->typed_data();
  ParallelFor(pool, x.dimensions()[0] * rows, [&](int64_t unit) {
    const int64_t n = unit / rows, p = unit % rows;
    for (int64_t q = 0; q < cols; ++q) {
      const int64_t tile = unit * cols + q;
      const float* origin = in + ((n * height + p * stride) * width + q * stride) * channels;
      for (size_t t = 0; t < terms.size(); ++t) {  // Terms come grouped by plane.
        const Term& term = terms[t];
        float* dst = out + (term.dst * tiles + tile) * channels;
        const float* src = origin + term.src;
        if (t == 0 || terms[t - 1].dst != term.dst) {
          for (int64_t c = 0; c < channels; ++c) dst[c] = term.coefficient * src[c];
        } else {
          for (int64_t c = 0; c < channels; ++c) dst[c] += term.coefficient * src[c];
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PlanesToPixels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> planes, ffi::Span<const float> matrix,
                          int64_t window, int64_t stride, ffi::ResultBuffer<ffi::F32> pixels) {
  const auto in_dims = planes.dimensions();
  const auto out_dims = pixels->dimensions();
  const int64_t side = static_cast<int64_t>(matrix.size()) / window;
  // `matrix` is [window, side] here: the transpose of the windows_to_planes form.
  std::vector<float> transposed(matrix.size());
  for (int64_t i = 0; i < window; ++i)
    for (int64_t a = 0; a < side; ++a) transposed[a * window + i] = matrix[i * side + a];
  int64_t rows, cols;
  if (ffi::Error error = CheckShapes(in_dims[0], in_dims[1], in_dims[2], out_dims, side, window, stride,
                                     &rows, &cols);
      error.failure()) {
    return error;
  }
  const int64_t height = out_dims[1], width = out_dims[2], channels = out_dims[3];
  const int64_t tiles = in_dims[1];
  // For each pixel (i, j) of a window, the planes it receives from: terms grouped by pixel.
  std::vector<std::vector<Term>> by_pixel(window * window);
  for (const Term& term : TileTerms(ffi::Span<const float>(transposed.data(), transposed.size()), window)) {
    by_pixel[term.src].push_back({term.src, term.dst * tiles * channels, term.coefficient});
  }
  const float* in = planes.typed_data();
  float* out = pixels->typed_data();
  // One unit per output pixel row; it gathers from every tile whose window covers the row.
  ParallelFor(pool, out_dims[0] * height, [&](int64_t unit) {
    const int64_t n = unit / height, y = unit % height;
    float* row = out + unit * width * channels;
    std::fill(row, row + width * channels, 0.0f);
    for (int64_t p = std::max<int64_t>(0, (y - window + stride) / stride); p <= std::min(rows - 1, y / stride);
         ++p) {
      const int64_t i = y - p * stride;
      const float* tile_row = in + (n * rows + p) * cols * channels;
      // Plane by plane, each read in one sequential run along the tile row.
      for (int64_t j = 0; j < window; ++j) {
        for (const Term& term : by_pixel[i * window + j]) {
          for (int64_t q = 0; q < cols; ++q) {
            float* dst = row + (q * stride + j) * channels;
            const float* src = tile_row + q * channels + term.src;
            for (int64_t c = 0; c < channels; ++c) dst[c] += term.coefficient * src[c];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmsanetWindowsToPlanes, WindowsToPlanes,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("matrix")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmsanetPlanesToPixels, PlanesToPixels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("matrix")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Ret<ffi::Buffer<ffi::F32>>());
