// The geometry of one multi-scale deformable attention call and the sampling rule of the contract
// (shared/spec/dcnv4-op.md section 2), shared by the CPU and CUDA kernels so that both compute the same
// coordinates the same way.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/bilinear.h"
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
// (x = loc_x * W - 0.5, y = loc_y * H - 0.5): the rule of common/bilinear.h (a point is used only if
// -1 < y < H and -1 < x < W; a missing corner has index -1 and weight 0), with the corners' flat positions
// in the value (start + y * W + x). A NaN coordinate is flagged so that the kernels can propagate it (the
// output becomes NaN, as in the reference).
template <typename T>
struct MSDACorners : Corners<T, int32_t> {
  bool nan;
};

template <typename T>
MMDCNV4_HOST_DEVICE MSDACorners<T> msda_corners(T x, T y, int32_t height, int32_t width, int32_t start) {
  MSDACorners<T> c;
  c.nan = (x != x) || (y != y);
  static_cast<Corners<T, int32_t>&>(c) = bilinear_corners<T, int32_t>(y, x, height, width, start);
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
