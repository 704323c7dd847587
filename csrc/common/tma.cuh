// Copies of 2-D regions of NHWC tensors into shared memory by the tensor memory accelerator (sm_90): one
// thread issues one bulk copy per region (a tile's input pixels; in the staged forward also its offsets),
// zeros outside the tensor, and the block waits on a shared-memory barrier. It replaces a copy loop that
// cost every thread 24 instructions per 16 bytes.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#if CUDA_VERSION >= 12000
#include <cudaTypedefs.h>
#endif

#include <cstdint>

#include "common/cuda_buffers.cuh"

namespace mmdcnv4 {
namespace cuda_tma {

// Tensor maps exist from CUDA 12.0; with an older toolkit the region is always copied by the threads.
#if CUDA_VERSION >= 12000
#define MMDCNV4_TENSOR_MAPS 1
using RegionMap = CUtensorMap;
#else
struct alignas(64) RegionMap {
  unsigned long long opaque[16];
};
#endif

// The descriptor of boxes of `box_channels` x `cols` x `rows` elements (channels, then pixels of a row, then
// rows) of an N x H x W x C tensor of `element_bytes`-byte elements at `data`, for the GPU `device`. False
// when the GPU has no copy engine (before sm_90) or the driver no tensor maps or refuses this one (the caller
// copies another way).
inline bool encode_region_map(RegionMap* map, int device, const void* data, int element_bytes, int64_t N,
                              int64_t H, int64_t W, int64_t C, int box_channels, int cols, int rows) {
#ifndef MMDCNV4_TENSOR_MAPS
  return false;
#else
  if (!cuda_buffers::is_sm90_or_later(device)) return false;  // no copy engine
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
        cudaSuccess) {
#else
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found) != cudaSuccess) {
#endif
      cudaGetLastError();  // clear it: the caller falls back
      fn = nullptr;
    }
    return found == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn) : nullptr;
  }();
  if (encode == nullptr || element_bytes != 2 && element_bytes != 4) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(C), static_cast<cuuint64_t>(W), static_cast<cuuint64_t>(H),
                              static_cast<cuuint64_t>(N)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(C * element_bytes),
                                 static_cast<cuuint64_t>(W * C * element_bytes),
                                 static_cast<cuuint64_t>(H * W * C * element_bytes)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_channels), static_cast<cuuint32_t>(cols),
                             static_cast<cuuint32_t>(rows), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return encode(map, element_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_UINT32, 4,
                const_cast<void*>(data), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
#endif
}

// Readies `barrier` (8 bytes of shared memory) for copies of `bytes` in all; every thread of the block calls
// it (one block barrier inside). Thread 0 then issues the copies (copy_box), and the block waits with
// wait_region before reading them; in between, the threads can do other work while the copy engine copies.
__device__ __forceinline__ void arm_barrier(unsigned long long* barrier, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(MMDCNV4_TENSOR_MAPS)
  const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(barrier));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the copy engine sees the barrier
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
  }
#endif
}

// Thread 0 only: copies the box at (channel, x, y, image) of `map` (negative or past the edge: zeros) to
// `shared` (128-byte aligned), counted on `barrier` (arm_barrier).
__device__ __forceinline__ void copy_box(void* shared, const RegionMap* map, unsigned long long* barrier, int channel,
                                         int x, int y, int image) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(MMDCNV4_TENSOR_MAPS)
  const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(barrier));
  const unsigned target = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(target),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(channel), "r"(x), "r"(y), "r"(image), "r"(bar)
      : "memory");
#endif
}

// Waits until the copies counted on `barrier` (arm_barrier) have landed.
__device__ __forceinline__ void wait_region(unsigned long long* barrier) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(MMDCNV4_TENSOR_MAPS)
  const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(barrier));
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred ready;\n mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], 0;\n selp.u32 %0, 1, 0, "
        "ready;\n}\n"
        : "=r"(done)
        : "r"(bar)
        : "memory");
  } while (!done);
#endif
}

}  // namespace cuda_tma
}  // namespace mmdcnv4
