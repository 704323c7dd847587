// Gradient buffers of the CUDA backward passes: zero-filled with one driver memset (or one kernel, under
// which the next kernel can start: zeros_under_next) and rounded from fp32 with one launch, instead of
// at::zeros and Tensor::to, which each set up a TensorIterator on the host (a deterministic mode's int64
// fixed point is converted likewise: common/fixed_point.cuh). The backward of a small problem is bound by
// host time (docs/ms_deform_attn.md, DINO decoder). Also the per-device queries that size
// launches (cached, so they cost no host time after the first), and launches as dependent kernels
// (common/grid_dependency.cuh).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "common/grid_dependency.cuh"

namespace mmdcnv4 {
namespace cuda_buffers {

// compute(device), computed once per device and cached (one cache per call site: each lambda is its own
// type). compute must return a non-zero value, 0 meaning "not known yet".
template <typename Compute>
int64_t cached_per_device(int device, Compute compute) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    if (const int64_t known = cache[device].load(std::memory_order_relaxed)) return known;
  }
  const int64_t value = compute(device);
  if (cacheable) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// Whether the GPU is sm_90 or later (the copy engine, dependent launches).
inline bool is_sm90_or_later(int device) {
  return cached_per_device(device, [](int d) {
           int major = 0;
           C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d));
           return int64_t{major >= 9 ? 2 : 1};  // nonzero: the cache's "unknown" is 0
         }) == 2;
}

// The GPU's streaming multiprocessors.
inline int64_t multiprocessors(int device) {
  return cached_per_device(device, [](int d) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d));
    return static_cast<int64_t>(sms);
  });
}

// Threads the device holds at once (SMs x threads per SM): one "wave".
inline int64_t resident_threads(int device) {
  return cached_per_device(device, [](int d) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, d));
    return static_cast<int64_t>(sms) * per_sm;
  });
}

// Blocks of `threads` threads for a grid-stride loop over `items`: one per `threads` items, at most one wave of
// the device.
inline int wave_blocks(int device, int64_t items, int threads) {
  const int64_t wave = resident_threads(device) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + threads - 1) / threads, wave)));
}

// Lets kKernel take up to kBytes of dynamic shared memory on `device` (the current one), past the default
// 48 KB: set once per device.
template <auto kKernel, int kBytes>
void allow_dynamic_shared(int device) {
  cached_per_device(device, [](int) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
    return int64_t{1};  // nonzero: the cache's "unknown" is 0
  });
}

// Threads of one wave of `kernel` on `device` (the current one): SMs x the kernel's resident blocks of
// `block_threads` threads with `shared_bytes` of dynamic shared memory each. Cache it with
// cached_per_device.
template <typename Kernel>
int64_t kernel_wave_threads(int device, Kernel kernel, int block_threads, size_t shared_bytes) {
  int sms = 0, blocks = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads, shared_bytes));
  return static_cast<int64_t>(sms) * blocks * block_threads;
}

// A new contiguous tensor of zeros, filled on `stream` (the caller's current stream, on its device).
inline at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor t = at::empty(sizes, options);
  if (t.numel() > 0) C10_CUDA_CHECK(cudaMemsetAsync(t.mutable_data_ptr(), 0, t.nbytes(), stream));
  return t;
}

// Launches kernel<<<grid, block, shared, stream>>>(args...), as a dependent launch when `dependent` and the
// GPU has them (sm_90 and later; an ordinary launch elsewhere); see common/grid_dependency.cuh.
template <typename... Params, typename... Args>
void launch_kernel(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  if (dependent) {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    if (is_sm90_or_later(device)) {
      config.attrs = attribute;
      config.numAttrs = 1;
    }
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Zeros `count` units at `out`, then `tail` bytes after them; lets the next kernel start first.
template <typename Unit>  // a template, as a kernel defined in a header must be, to be defined once
__global__ void __launch_bounds__(256) zero_kernel(Unit* __restrict__ out, int64_t count, int tail) {
  grid_dependency::release_dependents();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = first; i < count; i += stride) out[i] = Unit{};
  if (first < tail) reinterpret_cast<unsigned char*>(out + count)[first] = 0;
}

// As zeros, filled by zero_kernel: the kernel launched next with launch_kernel(true, ...) may run under the
// fill (a memory-bound fill under that kernel's compute-bound start), provided it waits
// (grid_dependency::wait_for_prior_grids) before it touches the tensor. Two blocks an SM, so that the fill
// leaves room on every SM for that kernel's blocks.
inline at::Tensor zeros_under_next(at::IntArrayRef sizes, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor t = at::empty(sizes, options);
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes == 0) return t;
  constexpr int kThreads = 256;
  const int64_t units = bytes / 16;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((units + kThreads - 1) / kThreads, 2 * multiprocessors(t.get_device())));
  // The caching allocator's blocks are 512-byte aligned, and a new tensor starts its storage.
  zero_kernel<uint4><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<uint4*>(t.mutable_data_ptr()), units, static_cast<int>(bytes % 16));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return t;
}

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) FourValues {
  scalar_t v[4];
};

// out[i] = accum[i] rounded to nearest, 4 elements per access (both buffers come from the caching
// allocator, so they are 16- and 8-byte aligned). Launched as a dependent kernel, it waits for the kernel that
// fills accum.
template <typename scalar_t>
__global__ void round_kernel(const float* __restrict__ accum, int64_t count, scalar_t* __restrict__ out) {
  grid_dependency::wait_for_prior_grids();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = first; i < count / 4; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(accum)[i];
    FourValues<scalar_t> r;
    r.v[0] = static_cast<scalar_t>(v.x);
    r.v[1] = static_cast<scalar_t>(v.y);
    r.v[2] = static_cast<scalar_t>(v.z);
    r.v[3] = static_cast<scalar_t>(v.w);
    reinterpret_cast<FourValues<scalar_t>*>(out)[i] = r;
  }
  for (int64_t i = count / 4 * 4 + first; i < count; i += stride) out[i] = static_cast<scalar_t>(accum[i]);
}

// The fp32 tensor `accum` rounded into `out` (fp16 or bf16, as many elements, both contiguous); `dependent`:
// launched as a dependent kernel (its launch overlaps the end of the kernel before it).
template <typename scalar_t>
void round_into(const at::Tensor& accum, const at::Tensor& out, cudaStream_t stream, bool dependent = false) {
  const int64_t count = accum.numel();
  if (count == 0) return;
  constexpr int kThreads = 256;
  const int blocks = wave_blocks(out.get_device(), count / 4, kThreads);
  launch_kernel(dependent, round_kernel<scalar_t>, dim3(blocks), dim3(kThreads), 0, stream,
                accum.const_data_ptr<float>(), count, out.mutable_data_ptr<scalar_t>());
}

}  // namespace cuda_buffers
}  // namespace mmdcnv4
