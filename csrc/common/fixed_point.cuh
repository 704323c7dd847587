// The scale of a deterministic mode's int64 fixed-point value gradient, on the device (no host
// synchronisation, a few launches and no ATen ops: small problems are bound by host time). Shared by the
// DCNv4 and multi-scale deformable attention backward passes; the conversion back is
// cuda_buffers::fixed_point_into.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace mmdcnv4 {
namespace fixed_point {

// Elements of a tensor: `rows` rows `row_stride` apart; in each, `runs` runs of `run` consecutive elements,
// `run_stride` apart, the first at `offset`.
struct Layout {
  int64_t rows, row_stride;
  int runs, run, run_stride, offset;
};

inline Layout contiguous(int64_t count) { return {count, 1, 1, 1, 1, 0}; }

// max |x| over the layout's elements, into *out (zero-filled, as float bits; atomicMax on the bits of
// non-negative floats is order-independent and keeps a NaN, whose bits exceed those of +inf).
template <typename scalar_t>
__global__ void abs_max_kernel(const scalar_t* __restrict__ x, Layout l, float* out) {
  const int per_row = l.runs * l.run;
  const int64_t count = l.rows * per_row;
  float m = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    const int in_row = static_cast<int>(i - row * per_row), r = in_row / l.run;
    const float v = fabsf(static_cast<float>(x[row * l.row_stride + l.offset + r * l.run_stride + in_row - r * l.run]));
    m = (v > m || v != v) ? v : m;
  }
  unsigned bits = __float_as_uint(m);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, offset));
  if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<unsigned*>(out), bits);
}

template <typename scalar_t>
void launch_abs_max(const scalar_t* x, const Layout& layout, float* out, cudaStream_t stream) {
  const int64_t count = layout.rows * layout.runs * layout.run;
  if (count == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 1024));
  abs_max_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, layout, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The largest power of two s such that s * bound stays below 2^62, where bound (the product of the first
// `factors` maxima in absmax, times `terms`) bounds the magnitude of any partial sum: at most 2^1000, 1 when
// the bound is zero (every term is zero), 0 when it is not finite (NaN or Inf gradients: the value
// gradient is then NaN). A template, as a kernel defined in a header must be, to be defined once.
template <typename real_t>
__global__ void __launch_bounds__(1) scale_kernel(const float* __restrict__ absmax, int factors, real_t terms,
                                                  real_t* scale) {
  real_t bound = 1.0;
  for (int i = 0; i < factors; ++i) bound *= static_cast<real_t>(absmax[i]);
  bound *= terms;
  if (!(bound < INFINITY)) {
    *scale = 0.0;
  } else if (bound <= 0.0) {
    *scale = 1.0;
  } else {
    *scale = exp2(fmin(floor(62.0 - log2(bound)), 1000.0));
  }
}

inline void launch_scale(const float* absmax, int factors, double terms, double* scale, cudaStream_t stream) {
  scale_kernel<double><<<1, 1, 0, stream>>>(absmax, factors, terms, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fixed_point
}  // namespace mmdcnv4
