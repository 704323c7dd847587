// The geometry of one DCNv4 call and the sampling rule of the contract (shared/spec/dcnv4-op.md),
// shared by the CPU and CUDA kernels so that both compute the same coordinates the same way.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace mmdcnv4 {

struct DCNv4Params {
  int64_t batch, height, width, channels;  // value (N, H, W, C)
  int64_t out_height, out_width;           // output (N, Ho, Wo, C)
  int64_t om_channels;                     // P, the last dimension of offset_mask
  int group, group_channels;               // G and D, C = G * D
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int points;                              // K = kernel_h * kernel_w - remove_center
  bool remove_center;
  double offset_scale;
};

// Sampling position of point (i, j) of the window at output (yo, xo), before the learned offset:
// centre of the window plus the regular grid offset, both in pixel units.
template <typename T>
struct WindowOrigin {
  T x, y;
};

template <typename T>
MMDCNV4_HOST_DEVICE WindowOrigin<T> window_centre(const DCNv4Params& p, int64_t yo, int64_t xo) {
  const int half_w = (p.dilation_w * (p.kernel_w - 1)) / 2;
  const int half_h = (p.dilation_h * (p.kernel_h - 1)) / 2;
  return {static_cast<T>(xo * p.stride_w - p.pad_w + half_w), static_cast<T>(yo * p.stride_h - p.pad_h + half_h)};
}

// Bilinear corners of a point: flat pixel indices (-1 when outside the image) and weights.
// A point is used only if -1 < y < H and -1 < x < W (strict); otherwise all weights are zero.
// I is the index type: int64_t on the CPU, int on the GPU (whose launchers check the image fits).
template <typename T, typename I = int64_t>
struct Corners {
  I index[4];  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  T weight[4];
  T lx, ly;
  bool used;
};

template <typename T, typename I = int64_t>
MMDCNV4_HOST_DEVICE Corners<T, I> bilinear_corners(T y, T x, I height, I width) {
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
  c.index[0] = (top && left) ? y0 * width + x0 : -1;
  c.index[1] = (top && right) ? y0 * width + x0 + 1 : -1;
  c.index[2] = (bottom && left) ? (y0 + 1) * width + x0 : -1;
  c.index[3] = (bottom && right) ? (y0 + 1) * width + x0 + 1 : -1;
  c.weight[0] = c.index[0] >= 0 ? hy * hx : T(0);
  c.weight[1] = c.index[1] >= 0 ? hy * c.lx : T(0);
  c.weight[2] = c.index[2] >= 0 ? c.ly * hx : T(0);
  c.weight[3] = c.index[3] >= 0 ? c.ly * c.lx : T(0);
  return c;
}

}  // namespace mmdcnv4
