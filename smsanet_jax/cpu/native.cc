// Winograd transforms for XLA:CPU, as XLA FFI custom calls (built and loaded by native.py's prepare()).
//
// Every transform that winograd.py's convolution needs is one of two shapes, with a small
// constant matrix M applied along both spatial axes of each window:
//
//   windows_to_planes: plane (b, a) of window (p, q) = sum_ij M[a][i] M[b][j] x[s*p + i, s*q + j]
//     (the input transform with M = B^T, the output transform's adjoint with M = A, and the
//     kernel transform with M = G on a kernel seen as one r x r window of I * O channels);
//   planes_to_pixels: the transpose, summed where windows overlap (the output transform with
//     M = A^T, the input transform's adjoint with M = B, the kernel's with M = G^T).
//
// Windows start at s*p - pad_top (s*q - pad_left): pixels outside the image read as zero, and
// what falls outside it is dropped. Planes are ordered (column b, row a):
// [planes, N, P * Q windows, C]; pixels are [N, H, W, C]. XLA's own fusions of these transforms
// take two passes (rows, then columns) over a 4x expanded array; here each window is done in
// cache, in one pass over memory. Both are memory-bound, so the work is split over XLA's
// intra-op threads: no two threads write the same memory, and every sum is in a fixed order.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One non-zero of the tile map kron(M, M): plane `plane` receives `coefficient` times window
// pixel (row, col).
struct Term {
  int64_t plane;
  int64_t row;
  int64_t col;
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
  while (progress->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// The tile map's non-zeros, grouped by plane: plane (b, a) <- window pixel (i, j) with
// M[a][i] * M[b][j], for M of shape [side, window] given row-major.
std::vector<Term> TileTerms(const std::vector<float>& matrix, int64_t window) {
  const int64_t side = static_cast<int64_t>(matrix.size()) / window;
  std::vector<Term> terms;
  for (int64_t b = 0; b < side; ++b)
    for (int64_t a = 0; a < side; ++a)
      for (int64_t i = 0; i < window; ++i)
        for (int64_t j = 0; j < window; ++j) {
          const float coefficient = matrix[a * window + i] * matrix[b * window + j];
          if (coefficient != 0) terms.push_back({b * side + a, i, j, coefficient});
        }
  return terms;
}

// Work is split by rows of windows (or of pixels), and wide channel axes into slices of this many
// channels too: a kernel transform ([3, 3, I * O] as one window) is a single row.
constexpr int64_t kSliceChannels = 4096;

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The geometry both transforms share: window (p, q) of image n starts at pixel
// (stride * p - pad_top, stride * q - pad_left); pixels outside the image are zero.
struct Grid {
  int64_t images, height, width, channels;  // The [N, H, W, C] image.
  int64_t rows, cols;                       // Windows per image.
  int64_t window, stride, pad_top, pad_left;
  int64_t side;                             // Planes per axis: planes are side x side.
};

ffi::Error MakeGrid(ffi::Span<const int64_t> image, ffi::Span<const int64_t> planes, int64_t matrix_size,
                    int64_t window, int64_t stride, int64_t pad_top, int64_t pad_left, int64_t rows,
                    int64_t cols, Grid* grid) {
  const int64_t side = window > 0 ? matrix_size / window : 0;
  if (image.size() != 4 || planes.size() != 4 || window < 1 || stride < 1 || pad_top < 0 || pad_left < 0 ||
      rows < 0 || cols < 0 || side * window != matrix_size || planes[0] != side * side || planes[1] != image[0] ||
      planes[2] != rows * cols || planes[3] != image[3]) {
    return ffi::Error::InvalidArgument(
        "smsanet winograd transform: the image, plane and matrix shapes do not agree");
  }
  *grid = {image[0], image[1], image[2], image[3], rows, cols, window, stride, pad_top, pad_left, side};
  return ffi::Error::Success();
}

ffi::Error WindowsToPlanes(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> image, ffi::Span<const float> matrix,
                           int64_t window, int64_t stride, int64_t pad_top, int64_t pad_left, int64_t rows,
                           int64_t cols, ffi::ResultBuffer<ffi::F32> planes) {
  Grid g;
  if (ffi::Error error = MakeGrid(image.dimensions(), planes->dimensions(), matrix.size(), window, stride,
                                  pad_top, pad_left, rows, cols, &g);
      error.failure()) {
    return error;
  }
  const std::vector<Term> terms = TileTerms(std::vector<float>(matrix.begin(), matrix.end()), window);
  const int64_t tiles = g.images * g.rows * g.cols, channels = g.channels;
  const float* in = image.typed_data();
  float* out = planes->typed_data();
  const int64_t slices = (channels + kSliceChannels - 1) / kSliceChannels;
  ParallelFor(pool, g.images * g.rows * slices, [&](int64_t unit) {
    const int64_t window_row = unit / slices, first = unit % slices * kSliceChannels;
    const int64_t count = std::min(kSliceChannels, channels - first);
    const int64_t n = window_row / g.rows, y0 = window_row % g.rows * g.stride - g.pad_top;
    for (int64_t q = 0; q < g.cols; ++q) {
      const int64_t x0 = q * g.stride - g.pad_left, tile = window_row * g.cols + q;
      for (size_t t = 0; t < terms.size();) {
        const int64_t plane = terms[t].plane;
        float* dst = out + (plane * tiles + tile) * channels + first;
        bool written = false;
        for (; t < terms.size() && terms[t].plane == plane; ++t) {
          const Term& term = terms[t];
          const int64_t y = y0 + term.row, x = x0 + term.col;
          if (y < 0 || y >= g.height || x < 0 || x >= g.width) continue;
          const float* src = in + ((n * g.height + y) * g.width + x) * channels + first;
          if (written) {
            for (int64_t c = 0; c < count; ++c) dst[c] += term.coefficient * src[c];
          } else {
            for (int64_t c = 0; c < count; ++c) dst[c] = term.coefficient * src[c];
            written = true;
          }
        }
        if (!written) std::fill(dst, dst + count, 0.0f);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PlanesToPixels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> planes, ffi::Span<const float> matrix,
                          int64_t window, int64_t stride, int64_t pad_top, int64_t pad_left, int64_t rows,
                          int64_t cols, ffi::ResultBuffer<ffi::F32> image) {
  Grid g;
  if (ffi::Error error = MakeGrid(image->dimensions(), planes.dimensions(), matrix.size(), window, stride,
                                  pad_top, pad_left, rows, cols, &g);
      error.failure()) {
    return error;
  }
  // `matrix` is [window, side] here, the transpose of the windows_to_planes form.
  std::vector<float> transposed(matrix.size());
  for (int64_t i = 0; i < window; ++i)
    for (int64_t a = 0; a < g.side; ++a) transposed[a * window + i] = matrix[i * g.side + a];
  // For each window pixel (i, j), the planes it receives from.
  std::vector<std::vector<Term>> by_pixel(window * window);
  for (const Term& term : TileTerms(transposed, window)) by_pixel[term.row * window + term.col].push_back(term);
  const int64_t tiles = g.images * g.rows * g.cols, channels = g.channels;
  const float* in = planes.typed_data();
  float* out = image->typed_data();
  // One unit per image row (and channel slice), which gathers from every window that covers it:
  // no two units write the same pixel, and every pixel sums its windows in the same order.
  const int64_t slices = (channels + kSliceChannels - 1) / kSliceChannels;
  ParallelFor(pool, g.images * g.height * slices, [&](int64_t unit) {
    const int64_t image_row = unit / slices, first = unit % slices * kSliceChannels;
    const int64_t count = std::min(kSliceChannels, channels - first);
    const int64_t n = image_row / g.height, y = image_row % g.height + g.pad_top;  // y in window coordinates.
    float* row = out + image_row * g.width * channels + first;
    for (int64_t x = 0; x < g.width; ++x) std::fill(row + x * channels, row + x * channels + count, 0.0f);
    const int64_t first_p = std::max<int64_t>(0, FloorDiv(y - window, g.stride) + 1);
    for (int64_t p = first_p; p <= std::min(g.rows - 1, y / g.stride); ++p) {
      const float* tile_row = in + (n * g.rows + p) * g.cols * channels + first;
      for (int64_t j = 0; j < window; ++j) {
        // Windows q whose column j lands inside the image: 0 <= stride * q - pad_left + j < W.
        const int64_t first_q = std::max<int64_t>(0, FloorDiv(g.pad_left - j - 1, g.stride) + 1);
        const int64_t last_q = std::min(g.cols - 1, FloorDiv(g.width - 1 + g.pad_left - j, g.stride));
        // Plane by plane, each read in one sequential run along the row of windows.
        for (const Term& term : by_pixel[(y - p * g.stride) * window + j]) {
          for (int64_t q = first_q; q <= last_q; ++q) {
            float* dst = row + (q * g.stride - g.pad_left + j) * channels;
            const float* src = tile_row + (term.plane * tiles + q) * channels;
            for (int64_t c = 0; c < count; ++c) dst[c] += term.coefficient * src[c];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Both transforms take the same operands and attributes.
auto TransformBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const float>>("matrix")
      .Attr<int64_t>("window")
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("rows")
      .Attr<int64_t>("cols")
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmsanetWindowsToPlanes, WindowsToPlanes, TransformBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SmsanetPlanesToPixels, PlanesToPixels, TransformBinding());
