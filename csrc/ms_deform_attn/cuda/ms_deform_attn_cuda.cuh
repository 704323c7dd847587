// Device code shared by the CUDA forward and backward kernels of multi-scale deformable attention.
//
// Work decomposition (both directions): a "slot" of LANES consecutive threads (LANES in {4, 8, 16, 32},
// always inside one warp) handles one (image, query, head) row; its lanes split the head's D channels,
// VEC consecutive channels each, loaded with one 16-byte access where D and the alignment allow (fp32:
// 4 channels, fp16/bf16: 8; fp16/bf16 use 8-byte accesses of 4 channels in the backward, and in a forward
// too small to fill the GPU), else one channel per access. Rows are taken head-major (consecutive slots:
// consecutive queries of one head), so the blocks in flight gather from, and scatter gradients into, one
// head's channels of the value: a working set 1/heads of the value's that stays in L2 (measured on an
// H200: BEV 200x200 forward + backward 1.14 -> 0.74 ms in fp32, the DINO encoder 1.33 -> 1.14 ms,
// against query-major rows). The sampling points of a row are processed in
// chunks of kChunk: the slot's lanes first compute, in parallel, each point's four corner positions and
// weights (the softmax of the flash layout folded in) into a small shared-memory table, then every lane
// walks the table and gathers its channels. The grid is (rows of one image / slots per block, images):
// a block never straddles two images, and no result depends on what else runs in the block, so a batched
// call gives bit for bit the per-image results.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <limits>

#include "common/cuda_buffers.cuh"
#include "common/fixed_point.cuh"
#include "ms_deform_attn/ms_deform_attn_host.h"
#include "ms_deform_attn/ms_deform_attn_params.h"

namespace mmdcnv4 {
namespace msda_cuda {

// Points per pass of the shared-memory point table.
constexpr int kChunk = 16;
// The flash backward keeps the per-point gradients a_j of a row in shared memory up to this many points
// (L*P); beyond, in a global scratch buffer.
constexpr int kStashPoints = 64;

template <int LANES>
struct Launch {
  static constexpr int threads = LANES <= 4 ? 128 : 256;
  static constexpr int slots = threads / LANES;
  // Blocks per SM the register budget must allow: half the SM's 2048 threads, i.e. at most 64 registers
  // a thread. The kernels wait on their loads (ncu, DINO decoder: 65-71 % of the stalls on L1TEX), so
  // occupancy is what keeps loads in flight; left alone, ptxas gave some instantiations 75-102 registers.
  // Measured on an H200, DINO decoder fp32: backward op 0.088 -> 0.076 ms with the bound.
  static constexpr int min_blocks = 1024 / threads;
};

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Lanes of the calling thread's slot, for __syncwarp and the shuffles.
template <int LANES>
__device__ __forceinline__ unsigned slot_mask() {
  if constexpr (LANES == 32) {
    return 0xffffffffu;
  } else {
    const unsigned first = (threadIdx.x % 32) / LANES * LANES;
    return ((1u << LANES) - 1u) << first;
  }
}

template <int LANES, typename T>
__device__ __forceinline__ T slot_sum(T v, unsigned mask) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset, LANES);
  return v;
}

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// ---- loads and stores of VEC consecutive channels, converted to and from the accumulation type -------
template <typename scalar_t, int VEC>
struct VecIO {
  static_assert(VEC == 1, "vector access is specialised per dtype");
  using acc_t = typename AccType<scalar_t>::type;
  static __device__ __forceinline__ void load(const scalar_t* __restrict__ p, acc_t* out) {
    out[0] = static_cast<acc_t>(p[0]);
  }
  static __device__ __forceinline__ void store(scalar_t* p, const acc_t* in) { p[0] = static_cast<scalar_t>(in[0]); }
};

template <>
struct VecIO<float, 4> {
  static __device__ __forceinline__ void load(const float* __restrict__ p, float* out) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* in) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  }
};

// fp16/bf16 loads and stores. The backward uses 8-byte accesses (4 channels): its value-gradient atomics
// add fp32, 4 channels (16 bytes) per thread, so that the threads of a warp cover whole L2 sectors.
template <typename scalar_t>
struct PairTraits;
template <>
struct PairTraits<c10::Half> {
  using pair_t = __half2;
  static __device__ __forceinline__ float2 to_float2(pair_t h) { return __half22float2(h); }
  static __device__ __forceinline__ pair_t from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct PairTraits<c10::BFloat16> {
  using pair_t = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(pair_t h) { return __bfloat1622float2(h); }
  static __device__ __forceinline__ pair_t from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// VEC (4 or 8) fp16/bf16 channels as one 8- or 16-byte access, converted two at a time.
template <typename scalar_t, int VEC>
struct HalfVecIO {
  static_assert(VEC == 4 || VEC == 8, "8- or 16-byte accesses");
  using Traits = PairTraits<scalar_t>;
  using pair_t = typename Traits::pair_t;
  static constexpr int kWords = VEC / 2;
  static __device__ __forceinline__ void load(const scalar_t* __restrict__ p, float* out) {
    unsigned words[kWords];
    if constexpr (VEC == 8) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      words[0] = raw.x, words[1] = raw.y, words[2] = raw.z, words[3] = raw.w;
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
      words[0] = raw.x, words[1] = raw.y;
    }
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      pair_t h;
      memcpy(&h, &words[i], sizeof(h));
      const float2 f = Traits::to_float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(scalar_t* p, const float* in) {
    unsigned words[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      const pair_t h = Traits::from_floats(in[2 * i], in[2 * i + 1]);
      memcpy(&words[i], &h, sizeof(h));
    }
    if constexpr (VEC == 8) {
      *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
      *reinterpret_cast<uint2*>(p) = make_uint2(words[0], words[1]);
    }
  }
};

template <>
struct VecIO<c10::Half, 8> : HalfVecIO<c10::Half, 8> {};
template <>
struct VecIO<c10::BFloat16, 8> : HalfVecIO<c10::BFloat16, 8> {};
template <>
struct VecIO<c10::Half, 4> : HalfVecIO<c10::Half, 4> {};
template <>
struct VecIO<c10::BFloat16, 4> : HalfVecIO<c10::BFloat16, 4> {};

// Channels per access of the backward (see above), and of small fp16/bf16 forwards: 4 for every
// vectorised dtype (16 bytes of fp32, 8 of fp16/bf16).
template <typename scalar_t>
constexpr int narrow_vector_width() {
  return std::is_same_v<scalar_t, double> ? 1 : 4;
}

// Channels per 16-byte access, for the vectorised kernels (fp64 always takes the scalar kernels).
template <typename scalar_t>
constexpr int vector_width() {
  return std::is_same_v<scalar_t, double> ? 1 : 16 / static_cast<int>(sizeof(scalar_t));
}

// ---- the point table ---------------------------------------------------------------------------------
// Level l of the tables, read through the read-only cache. `ok` is false for a level that does not fit in
// the value tensor (inconsistent tables): such a level contributes nothing, and nothing outside the value
// tensor is ever read.
struct LevelInfo {
  int height, width, start;
  bool ok;
};

__device__ __forceinline__ LevelInfo load_level(const int64_t* __restrict__ shapes,
                                                const int64_t* __restrict__ starts, int level, int len_in) {
  const int64_t h = __ldg(reinterpret_cast<const long long*>(shapes) + 2 * level);
  const int64_t w = __ldg(reinterpret_cast<const long long*>(shapes) + 2 * level + 1);
  const int64_t s = __ldg(reinterpret_cast<const long long*>(starts) + level);
  LevelInfo info;
  info.ok = msda_level_ok(h, w, s, len_in);
  info.height = info.ok ? static_cast<int>(h) : 0;
  info.width = info.ok ? static_cast<int>(w) : 0;
  info.start = info.ok ? static_cast<int>(s) : 0;
  return info;
}

// Softmax statistics of a row's L*P logits, computed by the slot's lanes together (online max and sum,
// then a butterfly merge): returns the max m and 1 / sum exp(x - m). A NaN logit makes the sum NaN, so
// the whole row becomes NaN as with torch.softmax; -inf logits get probability 0.
template <int LANES, typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* __restrict__ logits, int count, int lane,
                                              unsigned mask, acc_t& max_out, acc_t& inv_sum_out) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = neg_inf, s = acc_t(0);
  for (int j = lane; j < count; j += LANES) {
    const acc_t x = static_cast<acc_t>(logits[j]);
    if (x > m) {
      s = s * fast_exp(m - x) + acc_t(1);
      m = x;
    } else if (x != neg_inf) {
      s += fast_exp(x - m);
    }
  }
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset >>= 1) {
    const acc_t m2 = __shfl_xor_sync(mask, m, offset, LANES);
    const acc_t s2 = __shfl_xor_sync(mask, s, offset, LANES);
    const acc_t mm = m > m2 ? m : m2;
    if (mm != neg_inf) {
      s = (m == neg_inf ? acc_t(0) : s * fast_exp(m - mm)) + (m2 == neg_inf ? acc_t(0) : s2 * fast_exp(m2 - mm));
    } else {
      s = s + s2;
    }
    m = mm;
  }
  max_out = m;
  inv_sum_out = acc_t(1) / s;
}

// Probability of point j: the given weight (mmcv layout) or exp(logit - max) / sum (flash layout).
template <bool FLASH, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t point_probability(const scalar_t* __restrict__ weights, int j, acc_t m,
                                                   acc_t inv_sum) {
  const acc_t x = static_cast<acc_t>(weights[j]);
  if constexpr (FLASH) {
    return fast_exp(x - m) * inv_sum;
  } else {
    return x;
  }
}

// ---- value-gradient accumulation ---------------------------------------------------------------------
// Reductions (atomics whose old value is not needed: RED, not ATOM). No "memory" clobber: the kernels
// never read what they accumulate, so the compiler may keep moving loads across them.
__device__ __forceinline__ void red_add(float* p, float v) {
  asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(v));
}
__device__ __forceinline__ void red_add(double* p, double v) {
  asm volatile("red.global.add.f64 [%0], %1;" ::"l"(p), "d"(v));
}
__device__ __forceinline__ void red_add(unsigned long long* p, unsigned long long v) {
  asm volatile("red.global.add.u64 [%0], %1;" ::"l"(p), "l"(v));
}

// VEC channels at dst (an fp32 or fp64 accumulation buffer) += val. sm_90 has 16-byte float reductions.
template <int VEC>
__device__ __forceinline__ void atomic_add_channels(float* dst, const float* val) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = VEC % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst + i), "f"(val[i]), "f"(val[i + 1]),
                   "f"(val[i + 2]), "f"(val[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) red_add(dst + i, val[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_channels(double* dst, const double* val) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) red_add(dst + i, val[i]);
}

// Deterministic mode: VEC channels at dst (int64 fixed point with `scale` units per 1) += val. Integer
// addition is associative, so the result does not depend on the order of the atomics.
template <int VEC, typename acc_t>
__device__ __forceinline__ void fixed_add_channels(long long* dst, const acc_t* val, double scale) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const long long q = fixed_point::to_fixed(val[i], scale);
    if (q != 0) red_add(reinterpret_cast<unsigned long long*>(dst + i), static_cast<unsigned long long>(q));
  }
}

// ---- launch utilities ----------------------------------------------------------------------------
inline dim3 grid_for(int64_t rows_per_image, int slots, int64_t batch) {
  const int64_t blocks = (rows_per_image + slots - 1) / slots;
  TORCH_CHECK(blocks < std::numeric_limits<int32_t>::max(), "ms_deform_attn: problem too large");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min<int64_t>(batch, 65535)), 1);
}

using cuda_buffers::resident_threads;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Lanes per slot for D channels handled VEC at a time: the smallest of 4, 8, 16, 32 covering them.
inline int lanes_for(int64_t channels, int vec) {
  const int64_t chunks = (channels + vec - 1) / vec;
  if (chunks <= 4) return 4;
  if (chunks <= 8) return 8;
  if (chunks <= 16) return 16;
  return 32;
}

}  // namespace msda_cuda
}  // namespace mmdcnv4
