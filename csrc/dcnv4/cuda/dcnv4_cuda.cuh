// Device helpers shared by the DCNv4 CUDA kernels: vector loads and conversions over channels, the
// launch decomposition, and vector atomics.
//
// Thread mapping (forward and backward): a block covers a 2-D tile of output pixels of ONE image and a
// span of consecutive groups (gridDim = tiles x (groups / span * chunks) x images), so neighbouring
// pixels, whose sampling windows overlap, read their corners through the same L1, and no block ever
// straddles two images. A thread owns one vector of V channels (V * sizeof = 16 bytes on the fast
// paths); `lanes` threads share a (pixel, group). Inside a block the lanes of a (pixel, group) are
// consecutive, then the span's groups of that pixel, then the pixels: a pixel's offsets and weights of
// all its groups are contiguous in offset_mask, so a warp's offset load touches about one cache line
// per pixel instead of one per (pixel, group). Measured on an H200 (same timing method as the committed
// table, outputs bit-identical): forward T224 s1 64x56x56x64 fp16 0.166 -> 0.118 ms, T det s1 fp16
// 0.117 -> 0.083 ms; see docs/dcnv4_op.md.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/tma.cuh"
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

// Converts a loaded vector to the accumulation type: fp16 two elements per instruction; bf16 by a byte
// permute and a logic op per pair (ALU pipe), not the integer multiply-shifts the compiler picks for
// __bfloat1622float2 (FMA pipe, which the kernels' FFMAs keep busy; measured in the staged forward on an
// H200: T224 s2 bf16 0.0660 -> 0.0551 ms, see docs/dcnv4_op.md). Exact either way.
template <typename T, int V, typename A>
__device__ __forceinline__ void to_acc(const Vec<T, V>& in, A (&out)[V]) {
  if constexpr (std::is_same_v<T, at::Half> && V % 2 == 0) {
    const __half2* pairs = reinterpret_cast<const __half2*>(in.v);
#pragma unroll
    for (int e = 0; e < V / 2; ++e) {
      const float2 f = __half22float2(pairs[e]);
      out[2 * e] = f.x;
      out[2 * e + 1] = f.y;
    }
  } else if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<A, float> && V % 2 == 0) {
    const unsigned* pairs = reinterpret_cast<const unsigned*>(in.v);
#pragma unroll
    for (int e = 0; e < V / 2; ++e) {
      unsigned low, high;
      asm("prmt.b32 %0, %1, 0, 0x1044;" : "=r"(low) : "r"(pairs[e]));  // bytes 1, 0 -> 3, 2; zeros below
      asm("and.b32 %0, %1, 0xffff0000;" : "=r"(high) : "r"(pairs[e]));
      out[2 * e] = __uint_as_float(low);
      out[2 * e + 1] = __uint_as_float(high);
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = static_cast<A>(in.v[e]);
  }
}

template <typename T, int V, typename A>
__device__ __forceinline__ void store_from_acc(T* ptr, const A* in) {
  Vec<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.v[e] = static_cast<T>(in[e]);
  *reinterpret_cast<Vec<T, V>*>(ptr) = out;
}

// Whether V-element vectors fit: the group's channels are a multiple of V and every base pointer is
// aligned to a vector.
template <typename T, int V>
inline bool vector_fits(int group_channels, std::initializer_list<const void*> pointers) {
  if (group_channels % V != 0) return false;
  for (const void* ptr : pointers) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % (sizeof(T) * V) != 0) return false;
  }
  return true;
}

// Widest vector (in elements) the forward uses: 16 bytes when they fit, else 1.
template <typename T>
inline int pick_vector_width(int group_channels, std::initializer_list<const void*> pointers) {
  constexpr int kWide = 16 / sizeof(T);
  return vector_fits<T, kWide>(group_channels, pointers) ? kWide : 1;
}

// Vectors per thread: one, except the fp16/bf16 forward with 2 or 4 vectors a group (dcnv4_forward.cu),
// where two pay; elsewhere 2-8 vectors per thread measured up to twice slower on an H200 (fewer threads
// in flight), see docs/dcnv4_op.md.

// The kernels index within one image with 32-bit arithmetic.
inline void check_image_fits(const DCNv4Params& p) {
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  TORCH_CHECK(p.height * p.width * p.channels <= kMax && p.out_height * p.out_width * p.channels <= kMax &&
                  p.out_height * p.out_width * p.om_channels <= kMax,
              "dcnv4: one image of value/offset_mask/output has more than 2^31 elements; split it");
}

// How a launch cuts the output into blocks; see the file comment.
struct TileShape {
  int lanes;   // threads per (pixel, group, channel chunk)
  int chunks;  // blocks along the channels of a group (more than one only for very wide groups)
  int group_span;  // consecutive groups of a pixel in one block (threads: lane, then group, then pixel)
  int tile_h, tile_w;
  int tiles_x, tiles;
  int threads;  // per block: lanes * group_span * tile_h * tile_w
};

inline TileShape make_tile_shape(const DCNv4Params& p, int lanes, int chunks, int group_span = 1) {
  TileShape t;
  t.lanes = lanes;
  t.chunks = chunks;
  t.group_span = group_span;
  const int pixels = std::max(1, kThreadsPerBlock / (lanes * group_span));
  t.tile_w = pixels >= 128 ? 16 : std::min(pixels, 8);
  t.tile_h = pixels / t.tile_w;
  t.tiles_x = static_cast<int>((p.out_width + t.tile_w - 1) / t.tile_w);
  const int64_t tiles = static_cast<int64_t>(t.tiles_x) * ((p.out_height + t.tile_h - 1) / t.tile_h);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "dcnv4: output map too large");
  TORCH_CHECK(static_cast<int64_t>(p.group) * t.chunks < 65536, "dcnv4: too many groups");
  t.tiles = static_cast<int>(tiles);
  t.threads = lanes * group_span * t.tile_h * t.tile_w;
  return t;
}

// The output pixel, group and channel vector of this thread.
struct ThreadPlace {
  int n, g, yo, xo, lane, vec;
  bool inside;  // false for the tile's threads past the map's edge
};

__device__ __forceinline__ ThreadPlace thread_place(const DCNv4Params& p, const TileShape& t) {
  ThreadPlace place;
  place.lane = threadIdx.x % t.lanes;
  const int pixel_group = threadIdx.x / t.lanes;
  const int local = pixel_group / t.group_span;
  const int tile_y = blockIdx.x / t.tiles_x, tile_x = blockIdx.x - tile_y * t.tiles_x;
  place.yo = tile_y * t.tile_h + local / t.tile_w;
  place.xo = tile_x * t.tile_w + local % t.tile_w;
  place.g = blockIdx.y / t.chunks * t.group_span + pixel_group % t.group_span;
  place.vec = static_cast<int>(blockIdx.y % t.chunks) * t.lanes + place.lane;
  place.n = blockIdx.z;
  place.inside = place.yo < p.out_height && place.xo < p.out_width && threadIdx.x < t.threads;
  return place;
}

// Groups per block: the largest power of two that divides the groups and keeps all threads of a pixel
// inside one warp (lanes * span <= 32; the backward's shuffles need a (pixel, group)'s lanes aligned in a
// warp, which power-of-two lanes and span give). Wide groups (several chunks) keep one group per block.
inline int group_span_for(const DCNv4Params& p, int lanes, int chunks) {
  if (chunks > 1) return 1;
  int span = 1;
  while (p.group % (span * 2) == 0 && lanes * span * 2 <= 32) span *= 2;
  return span;
}

// The grid of a launch over `images` images (thread_place decodes it): tiles x (groups / span * chunks)
// x images.
inline dim3 tile_grid(const TileShape& t, const DCNv4Params& p, int64_t images) {
  return dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(p.group / t.group_span * t.chunks),
              static_cast<unsigned>(images));
}

// Launches over the batch in slices of at most 65535 images (the grid's z limit): launch(first, count).
template <typename Launch>
inline void for_each_batch_slice(int64_t images, Launch&& launch) {
  constexpr int64_t kMaxZ = 65535;
  for (int64_t first = 0; first < images; first += kMaxZ) launch(first, std::min(kMaxZ, images - first));
}

// The input pixels that the corners of a tile_h x tile_w tile of output pixels can fall on, for a 3x3 kernel
// and learned offsets up to `margin` pixels (before offset_scale): `extent` pixels beyond the first and
// last window centres of the tile, plus one row and column for the bottom-right corners. Its first pixel
// is the tile's first window centre minus the extents.
struct TileRegion {
  int extent_h, extent_w, rows, cols;
};

inline TileRegion tile_region(const DCNv4Params& p, int tile_h, int tile_w, int margin) {
  const double scale = std::abs(p.offset_scale);
  TileRegion r;
  r.extent_h = static_cast<int>(std::ceil(scale * (p.dilation_h + margin)));  // 3x3: half = dilation
  r.extent_w = static_cast<int>(std::ceil(scale * (p.dilation_w + margin)));
  r.rows = (tile_h - 1) * p.stride_h + 2 * r.extent_h + 2;
  r.cols = (tile_w - 1) * p.stride_w + 2 * r.extent_w + 2;
  return r;
}

// The tile shapes that cover the output map with equal tiles of at most `pixels` output pixels, one for each
// height from 4 to 16 rows: tile_w = pixels / tile_h, then both shrunk to the smallest size that keeps the tile
// count, so that a square map keeps square tiles (56 x 56: 8 x 8; 14 x 14: 7 x 7). Calls
// visit(tile_h, tile_w, tiles_x, tiles) for each, in that order; the staged forward and the sorted backward
// pick theirs among them.
template <typename Visit>
inline void for_each_tile_shape(const DCNv4Params& p, int pixels, Visit&& visit) {
  for (int h = 4; h <= 16; ++h) {
    const int w = pixels / h;
    const int64_t rows_of_tiles = (p.out_height + h - 1) / h, cols_of_tiles = (p.out_width + w - 1) / w;
    const int tile_h = static_cast<int>((p.out_height + rows_of_tiles - 1) / rows_of_tiles);
    const int tile_w = static_cast<int>((p.out_width + cols_of_tiles - 1) / cols_of_tiles);
    visit(tile_h, tile_w, cols_of_tiles, rows_of_tiles * cols_of_tiles);
  }
}

// Elements of a pixel's row of a tile's offsets and weights staged by the copy engine (the staged forward and
// the sorted backward), for `channels` of them of `element_bytes` each: 16 bytes of slack, since a row starts
// at the 16-byte boundary below the block's first offset (the copy engine raised an illegal-instruction fault
// on boxes that started inside a 16-byte unit, on an H200), rounded up to an odd number of 16-byte units, so
// that 4 consecutive pixels read different banks (rows of 128 bytes, all on one bank, made the staged forward
// of fp32 with 32 channels a group 10 % slower than with the offsets read from global memory).
constexpr int staged_offsets_row(int channels, int element_bytes) {
  const int bytes = (channels * element_bytes + 15) / 16 * 16 + 16;
  return (bytes % 32 == 0 ? bytes + 16 : bytes) / element_bytes;
}

// The channel a staged row starts at: the block's first offset channel `first`, rounded down to 16 bytes.
__host__ __device__ constexpr int staged_offsets_start(int first, int element_bytes) {
  return first & ~(16 / element_bytes - 1);
}

// The descriptor of a tile_h x tile_w box of offset_mask rows of `row` elements (staged_offsets_row); false
// where the copy engine cannot stage them (encode_region_map: rows not a multiple of 16 bytes, before sm_90, ...).
inline bool encode_offsets_map(cuda_tma::RegionMap* map, int device, const void* offset_mask, int element_bytes,
                               const DCNv4Params& p, int row, int tile_h, int tile_w) {
  return cuda_tma::encode_region_map(map, device, offset_mask, element_bytes, p.batch, p.out_height, p.out_width,
                                     p.om_channels, row, tile_w, tile_h);
}

// The input pixel of region cell 0 of the tile whose first output pixel is (y0, x0); `r` a TileRegion or a
// struct with its extents.
struct RegionOrigin {
  int y, x;
};

template <typename Region>
__device__ __forceinline__ RegionOrigin region_origin(const DCNv4Params& p, const Region& r, int y0, int x0) {
  const auto first_centre = window_centre<float>(p, y0, x0);
  return {static_cast<int>(first_centre.y) - r.extent_h, static_cast<int>(first_centre.x) - r.extent_w};
}

// Copies 16 bytes from global memory to the shared-memory address `shared_address` without passing through
// registers, or writes 16 zeros there when `valid` is false (the source is then not read).
__device__ __forceinline__ void copy_16_or_zeros(unsigned shared_address, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(global),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_all;\n" ::); }

// Starts copying a tile's region of input pixels (`rows` x `cols` from (region_y, region_x) of an H x W
// image) into shared memory, kColumns 16-byte vectors a pixel: region[cell * kColumns + column] gets the
// vector at `source + column * (16 bytes)` of the cell's pixel (pixels C elements apart), zeros outside
// the image. Thread i copies column i % kColumns of cells i / kColumns, i / kColumns + blockDim /
// kColumns, ...: whole runs of a pixel's vectors per kColumns threads; the cell's row and column advance
// by additions (one division before the loop; with a division per copy the staged forward took 63.2
// instead of 60.0 us, ncu at T224 s2 fp16, docs/dcnv4_op.md). The caller waits with wait_copies() and a
// barrier.
template <int kColumns, typename scalar_t>
__device__ __forceinline__ void stage_region(uint4* region, const scalar_t* source, int rows, int cols, int region_y,
                                             int region_x, int H, int W, int C) {
  const int cells = rows * cols;
  const int column = threadIdx.x % kColumns, cell_step = blockDim.x / kColumns;
  const int step_rows = cell_step / cols, step_cols = cell_step - step_rows * cols;
  int cell = threadIdx.x / kColumns;
  int h = cell / cols, w = cell - h * cols;  // the cell's pixel, from the region's first one
  h += region_y;
  w += region_x;
  const int end_w = region_x + cols;  // one past the region's last column
  source += column * (16 / sizeof(scalar_t));
  // 32-bit offsets and shared addresses: an image has fewer than 2^31 elements (check_image_fits).
  unsigned target = static_cast<unsigned>(__cvta_generic_to_shared(region + cell * kColumns + column));
  const unsigned target_step = cell_step * kColumns * sizeof(uint4);
#pragma unroll 1
  for (; cell < cells; cell += cell_step, target += target_step) {
    const bool inside =
        static_cast<unsigned>(h) < static_cast<unsigned>(H) && static_cast<unsigned>(w) < static_cast<unsigned>(W);
    const unsigned offset = static_cast<unsigned>(inside ? h * W + w : 0) * static_cast<unsigned>(C);
    copy_16_or_zeros(target, source + offset, inside);
    h += step_rows;
    w += step_cols;
    if (w >= end_w) {
      w -= cols;
      ++h;
    }
  }
}

// Point k (0 <= k < p.points) of a KH x KW window at `centre`, whose (pixel, group) offsets and weights
// start at `om`: its sampling position and weight m, in fp32 (the 3x3 kernels that share a point's
// geometry between the lanes of a pixel).
struct SamplePoint {
  float x, y, m;
};

// kRemoveCenter: -1 reads remove_center (and so the point count) from p; 0 or 1 fixes it at compile time,
// which leaves each unrolled point's grid position and weight index constants.
template <int KH, int KW, int kRemoveCenter = -1, typename scalar_t>
__device__ __forceinline__ SamplePoint sample_point(const DCNv4Params& p, const scalar_t* __restrict__ om,
                                                    const WindowOrigin<float>& centre, int k) {
  constexpr int kCentrePoint = (KW / 2) * KH + KH / 2;
  const bool remove_center = kRemoveCenter < 0 ? p.remove_center : kRemoveCenter == 1;
  const int points = kRemoveCenter < 0 ? p.points : KH * KW - kRemoveCenter;
  const int grid_point = k + (remove_center && k >= kCentrePoint ? 1 : 0);
  const int i = grid_point / KH, j = grid_point - i * KH;
  const auto pos =
      sampling_position<KH, KW>(p, centre, i, j, static_cast<float>(om[2 * k]), static_cast<float>(om[2 * k + 1]));
  return {pos.x, pos.y, static_cast<float>(om[2 * points + k])};
}

// Bit q set when bilinear corner q (top-left, top-right, bottom-left, bottom-right) of a point whose
// top-left corner is (y0, x0) lies inside an H x W image, the rule of bilinear_corners; no bit when the
// point is not used.
__device__ __forceinline__ int corners_inside(int y0, int x0, int H, int W, bool used = true) {
  const bool top = used && y0 >= 0, bottom = used && y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
  return (top && left) | (top && right) << 1 | (bottom && left) << 2 | (bottom && right) << 3;
}

// Offset of corner q given the top-left corner's (`first`), in elements: C (a pixel's channels) to the
// right, row (an image row's) down.
__device__ __forceinline__ int corner_offset(int first, int q, int C, int row) {
  return first + (q & 1 ? C : 0) + (q & 2 ? row : 0);
}

// Atomic add of V fp32 values at a 16-byte aligned address: vector atomics where the GPU has them
// (sm_90), scalar atomics otherwise.
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* address, const float* values) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = V % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      atomicAdd(reinterpret_cast<float4*>(address + e),
                make_float4(values[e], values[e + 1], values[e + 2], values[e + 3]));
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) atomicAdd(address + e, values[e]);
  }
}

template <int V>
__device__ __forceinline__ void atomic_add_vec(double* address, const double* values) {
#pragma unroll
  for (int e = 0; e < V; ++e) atomicAdd(address + e, values[e]);
}

}  // namespace cuda
}  // namespace mmdcnv4
