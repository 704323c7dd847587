// The bilinear sampling rule shared by DCNv4 and multi-scale deformable attention (the contract,
// shared/spec/dcnv4-op.md), for the CPU and CUDA kernels of both ops.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace mmdcnv4 {

// Bilinear corners of a point: flat pixel indices (-1 when outside the image) and weights.
// A point is used only if -1 < y < H and -1 < x < W (strict); otherwise all weights are zero.
// I is the index type: int64_t on the CPU, int on the GPU (whose launchers check the image fits).
// `start` offsets the indices (where the image begins in a larger array, as a level in MSDA's value).
template <typename T, typename I = int64_t>
struct Corners {
  I index[4];  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  T weight[4];
  T lx, ly;
  bool used;
};

template <typename T, typename I = int64_t>
MMDCNV4_HOST_DEVICE Corners<T, I> bilinear_corners(T y, T x, I height, I width, I start = 0) {
  Corners<T, I> c;
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
  const I y0 = static_cast<I>(fy), x0 = static_cast<I>(fx);
  c.ly = y - fy;
  c.lx = x - fx;
  const T hy = T(1) - c.ly, hx = T(1) - c.lx;
  const bool top = y0 >= 0, bottom = y0 + 1 < height, left = x0 >= 0, right = x0 + 1 < width;
  const I base = start + y0 * width + x0;
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

}  // namespace mmdcnv4
