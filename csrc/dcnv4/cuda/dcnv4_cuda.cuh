// Device helpers shared by the DCNv4 CUDA kernels: vector loads over channels, the per-point geometry,
// and the launch decomposition.
//
// Thread mapping (forward and backward): one thread per (output pixel, group, vector of V channels).
// Consecutive threads walk the channels of a group, then the groups of a pixel, then the pixels, so the
// V-wide loads of neighbouring threads are contiguous and no thread's work depends on which image its
// neighbours belong to (a block may span two images without any effect on the result).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "dcnv4/dcnv4_params.h"

namespace mmdcnv4 {
namespace cuda {

constexpr int kThreadsPerBlock = 256;

// V consecutive elements, aligned so that a load or store is one instruction (16 bytes when V is
// 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, V>*>(ptr);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, V>& vec) {
  *reinterpret_cast<Vec<T, V>*>(ptr) = vec;
}

// Widest vector (in elements) that divides the group's channels and that every base pointer allows.
template <typename T>
inline int pick_vector_width(int group_channels, std::initializer_list<const void*> pointers) {
  constexpr int kWide = 16 / sizeof(T);
  if (group_channels % kWide != 0) return 1;
  for (const void* ptr : pointers) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return 1;
  }
  return kWide;
}

// Position of the thread's output pixel.
struct PixelIndex {
  int n, yo, xo;
};

__device__ __forceinline__ PixelIndex pixel_index(const DCNv4Params& p, int pixel) {
  const int hw = static_cast<int>(p.out_height * p.out_width);
  PixelIndex idx;
  idx.n = pixel / hw;
  const int rem = pixel - idx.n * hw;
  idx.yo = rem / static_cast<int>(p.out_width);
  idx.xo = rem - idx.yo * static_cast<int>(p.out_width);
  return idx;
}

// Splits the batch into launches of at most 2^31 - 1 threads, whole images each, so that the kernels
// index threads with 32-bit arithmetic. Calls launch(first_image, image_count) for each part; the
// caller offsets its pointers by first_image.
template <typename Launch>
inline void for_each_image_chunk(int64_t images, int64_t threads_per_image, Launch&& launch) {
  const int64_t limit = (int64_t{1} << 31) - kThreadsPerBlock;
  TORCH_CHECK(threads_per_image <= limit, "dcnv4: one image needs ", threads_per_image,
              " threads, more than a launch can index; split the image");
  const int64_t per_launch = limit / threads_per_image;
  for (int64_t first = 0; first < images; first += per_launch) {
    launch(first, std::min(per_launch, images - first));
  }
}

inline int blocks_for(int64_t threads) {
  return static_cast<int>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

}  // namespace cuda
}  // namespace mmdcnv4
