// The geometry of one DCNv4 call and the sampling rule of the contract (shared/spec/dcnv4-op.md),
// shared by the CPU and CUDA kernels so that both compute the same coordinates the same way.
#pragma once

#include <cstdint>

#include "common/bilinear.h"
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

// Sampling position of kernel point (i, j) (i along the width, j along the height) of the window at
// `centre`, moved by its learned offset (dx, dy): the regular grid offset plus the learned one, scaled by
// offset_scale about the centre. Every kernel (CPU and CUDA, forward and backward) computes positions here,
// so that they agree to the last bit. KH, KW > 0: the kernel size known at compile time (CUDA fast paths).
template <int KH = 0, int KW = 0, typename T>
MMDCNV4_HOST_DEVICE WindowOrigin<T> sampling_position(const DCNv4Params& p, const WindowOrigin<T>& centre, int i,
                                                      int j, T dx, T dy) {
  const int kernel_h = KH > 0 ? KH : p.kernel_h, kernel_w = KW > 0 ? KW : p.kernel_w;
  const int half_w = (p.dilation_w * (kernel_w - 1)) / 2, half_h = (p.dilation_h * (kernel_h - 1)) / 2;
  const T scale = static_cast<T>(p.offset_scale);
  return {centre.x + (T(i * p.dilation_w - half_w) + dx) * scale,
          centre.y + (T(j * p.dilation_h - half_h) + dy) * scale};
}

}  // namespace mmdcnv4
