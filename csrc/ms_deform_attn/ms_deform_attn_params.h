// The geometry of one multi-scale deformable attention call and the sampling rule of the contract
// (shared/spec/dcnv4-op.md section 2), shared by the CPU and CUDA kernels so that both compute the same
// coordinates the same way.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace mmdcnv4 {

struct MSDAParams {
  int64_t batch, len_in, heads, channels;  // value (N, Len_in, heads, D)
  int64_t len_q;                           // queries per image
  int64_t levels, points;                  // L and P
  bool flash;                              // packed (locations, logits) layout with the softmax fused

  int64_t level_points() const { return levels * points; }
  // Values per (image, query, head) row of the sampling tensor: 3*L*P (flash) or 2*L*P (mmcv).
  int64_t sampling_row() const { return (flash ? 3 : 2) * levels * points; }
};

// Whether a level (H, W, start) lies inside a value of len_in positions. The Python wrapper checks that
// the tables are consistent; the kernels only rely on this, so that bad tables can never make them read
// outside the value tensor (on CUDA such a level contributes nothing; on CPU it is an error).
MMDCNV4_HOST_DEVICE bool msda_level_ok(int64_t height, int64_t width, int64_t start, int64_t len_in) {
  return height >= 1 && width >= 1 && height <= len_in && width <= len_in && start >= 0 && start <= len_in &&
         height * width <= len_in - start;
}

// Bilinear corners of one sampling point of a level, in pixel coordinates of that level
// (x = loc_x * W - 0.5, y = loc_y * H - 0.5): flat positions in the value (start + y * W + x, -1 when the
// corner is outside the level) and weights. A point is used only if -1 < y < H and -1 < x < W (strict);
// otherwise it contributes nothing and receives zero location gradient. A NaN coordinate is flagged so
// that the kernels can propagate it (the output becomes NaN, as in the reference).
template <typename T>
struct MSDACorners {
  int32_t index[4];  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  T weight[4];       // 0 for a missing corner
  T lx, ly;          // fractional parts, 0 when unused
  bool used;
  bool nan;
};

template <typename T>
MMDCNV4_HOST_DEVICE MSDACorners<T> msda_corners(T x, T y, int32_t height, int32_t width, int32_t start) {
  MSDACorners<T> c;
  c.nan = (x != x) || (y != y);
  c.used = (y > T(-1)) && (y < T(height)) && (x > T(-1)) && (x < T(width));
  if (!c.used) {
    for (int q = 0; q < 4; ++q) {
      c.index[q] = -1;
      c.weight[q] = T(0);
    }
    c.lx = c.ly = T(0);
    return c;
  }
  const T fy = floor(y), fx = floor(x);
  const int32_t y0 = static_cast<int32_t>(fy), x0 = static_cast<int32_t>(fx);
  c.ly = y - fy;
  c.lx = x - fx;
  const T hy = T(1) - c.ly, hx = T(1) - c.lx;
  const bool top = y0 >= 0, bottom = y0 + 1 < height, left = x0 >= 0, right = x0 + 1 < width;
  const int32_t base = start + y0 * width + x0;
  c.index[0] = (top && left) ? base : -1;
  c.index[1] = (top && right) ? base + 1 : -1;
  c.index[2] = (bottom && left) ? base + width : -1;
  c.index[3] = (bottom && right) ? base + width + 1 : -1;
  c.weight[0] = c.index[0] >= 0 ? hy * hx : T(0);
  c.weight[1] = c.index[1] >= 0 ? hy * c.lx : T(0);
  c.weight[2] = c.index[2] >= 0 ? c.ly * hx : T(0);
  c.weight[3] = c.index[3] >= 0 ? c.ly * c.lx : T(0);
  return c;
}

// Gradients of one used point from s[q] = sum_c g_c * v_c(corner q) (0 for a missing corner):
// a = sum_q w_q s_q (the gradient of the point's attention weight), and the derivatives of the bilinear
// sample along x and y (pixel units of the level).
template <typename T>
struct MSDAPointGrad {
  T a, gx, gy;
};

template <typename T>
MMDCNV4_HOST_DEVICE MSDAPointGrad<T> msda_point_grad(const T (&s)[4], const T (&weight)[4], T lx, T ly) {
  const T hx = T(1) - lx, hy = T(1) - ly;
  MSDAPointGrad<T> r;
  r.a = weight[0] * s[0] + weight[1] * s[1] + weight[2] * s[2] + weight[3] * s[3];
  r.gx = hy * (s[1] - s[0]) + ly * (s[3] - s[2]);
  r.gy = hx * (s[2] - s[0]) + lx * (s[3] - s[1]);
  return r;
}

}  // namespace mmdcnv4
