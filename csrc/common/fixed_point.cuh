// A deterministic mode's int64 fixed-point value gradient, shared by the DCNv4 and multi-scale deformable
// attention backward passes: its power-of-two scale, computed on the device (no host synchronisation, a few
// launches and no ATen ops: small problems are bound by host time), a contribution's rounding to it, and
// the conversion back to the value's dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_buffers.cuh"

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

// A contribution p in fixed point at scale s (rounded to nearest). A power-of-two s that is a float scales an
// fp32 p exactly, so the fp32 form gives the same integer as the double one with one conversion instead of two.
__device__ __forceinline__ long long to_fixed(float p, float s) { return __float2ll_rn(p * s); }
template <typename acc_t>
__device__ __forceinline__ long long to_fixed(acc_t p, double s) {
  return __double2ll_rn(static_cast<double>(p) * s);
}

// out[i] = fixed[i] / scale: a deterministic mode's int64 fixed-point value gradient back in the value's dtype,
// with the device scalar scale (a power of two, so the product by its reciprocal is exact) that the backward
// used; a scale that is not > 0 (NaN, for non-finite gradients, or 0) gives NaN. Launched as a dependent
// kernel, it waits for the kernel that fills `fixed`.
template <typename scalar_t>
__global__ void to_value_kernel(const long long* __restrict__ fixed, const double* __restrict__ scale, int64_t count,
                                scalar_t* __restrict__ out) {
  grid_dependency::wait_for_prior_grids();
  const double s = *scale;
  const double inv = s > 0.0 ? 1.0 / s : 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count; i += stride) {
    out[i] = static_cast<scalar_t>(s > 0.0 ? static_cast<double>(fixed[i]) * inv : static_cast<double>(NAN));
  }
}

// The int64 tensor `fixed` over the device scalar `scale` (double), into `out` (as many elements, both
// contiguous); `dependent` as in cuda_buffers::round_into.
template <typename scalar_t>
void to_value(const at::Tensor& fixed, const at::Tensor& scale, const at::Tensor& out, cudaStream_t stream,
              bool dependent = false) {
  const int64_t count = fixed.numel();
  if (count == 0) return;
  constexpr int kThreads = 256;
  const int blocks = cuda_buffers::wave_blocks(out.get_device(), count, kThreads);
  cuda_buffers::launch_kernel(dependent, to_value_kernel<scalar_t>, dim3(blocks), dim3(kThreads), 0, stream,
                              reinterpret_cast<const long long*>(fixed.const_data_ptr<int64_t>()),
                              scale.const_data_ptr<double>(), count, out.mutable_data_ptr<scalar_t>());
}

}  // namespace fixed_point
}  // namespace mmdcnv4
