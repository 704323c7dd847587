// DCNv4 forward on CUDA. One thread per (output pixel, group, one or two 16-byte channel vectors), in 2-D
// tiles (dcnv4_cuda.cuh): it reads its group's offsets and weights once per point, computes the bilinear
// weights in fp32 once, and accumulates its channels in fp32 from 16-byte corner loads.
#include <torch/library.h>

#include "common/cuda_buffers.cuh"
#include "common/tma.cuh"
#include "dcnv4/cuda/dcnv4_cuda.cuh"
#include "dcnv4/dcnv4_host.h"

namespace mmdcnv4 {
namespace cuda {
namespace {

// A point's four bilinear corners as the forward reads them: the flat index of the top-left corner
// (the others are +1, +W and +W+1), a bit per corner inside the image, and the weights m * bilinear
// weight. The values are those of bilinear_corners (the contract) times m; one index instead of four
// saves the forward a select, a compare and an address computation per corner.
template <typename T>
struct PointCorners {
  int base;
  int inside;  // bit q: corner q lies inside the image; kNanPoint: the point's position is NaN
  T weight[4];
};
constexpr int kNanPoint = 1 << 4;

// Whether a point at (y, x) in an H x W image contributes at all (see bilinear_corners).
template <typename T>
__device__ __forceinline__ bool point_used(T y, T x, int H, int W) {
  return y > T(-1) && y < T(H) && x > T(-1) && x < T(W);
}

// The four weights m * bilinear weight of a point at (y, x) whose top-left corner is (fy, fx), the floors.
template <typename T>
__device__ __forceinline__ void point_weights(T y, T x, T fy, T fx, T m, T (&weight)[4]) {
  const T ly = y - fy, lx = x - fx, hy = T(1) - ly, hx = T(1) - lx;
  weight[0] = m * (hy * hx);
  weight[1] = m * (hy * lx);
  weight[2] = m * (ly * hx);
  weight[3] = m * (ly * lx);
}

template <typename T>
__device__ __forceinline__ PointCorners<T> point_corners(T y, T x, T m, int H, int W) {
  PointCorners<T> pc;
  const bool used = point_used(y, x, H, W);
  const T fy = floor(y), fx = floor(x);
  const int y0 = static_cast<int>(fy), x0 = static_cast<int>(fx);
  pc.inside = corners_inside(y0, x0, H, W, used);
  pc.base = used ? y0 * W + x0 : 0;
  if (!used && (isnan(x) || isnan(y))) pc.inside = kNanPoint;  // NaN offsets propagate instead of vanishing
  point_weights(y, x, fy, fx, m, pc.weight);
  // A point outside the image contributes nothing whatever its m, a NaN or Inf one included (the contract):
  // gathers that read its corners as zeros (kTogether) must not see NaN * 0.
#pragma unroll
  for (int q = 0; q < 4; ++q) pc.weight[q] = used ? pc.weight[q] : T(0);
  return pc;
}

// acc[e] += weight * corner[e] over a corner's vector of V channels, widened to the accumulation type.
template <typename scalar_t, int V, typename T>
__device__ __forceinline__ void add_weighted(const Vec<scalar_t, V>& corner, T weight, T* acc) {
  T f[V];
  to_acc(corner, f);
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] += weight * f[e];
}

// Zeros for the corners outside the image when a point's loads go together: they read these instead of
// the image, so their loads need no branch (and a NaN or Inf in the image cannot leak in through a zero
// weight).
__device__ __align__(16) const unsigned char kZeroCorner[64] = {};

// Adds a point's corners over this thread's NV consecutive vectors of V channels (image: the thread's first
// channel) to acc. C: channels of a pixel, row: channels of an image row.
// kTogether issues the point's 4 x NV loads before using any of them: with a branch before each corner
// they wait one at a time (ncu, fp16 T224 s2: 60 % of the stall samples on long-scoreboard waits). A
// corner outside the image then reads kZeroCorner. Same sum in the same order either way, so the output is
// the same bit for bit.
template <typename scalar_t, int V, int NV, bool kTogether = false, typename T>
__device__ __forceinline__ void gather_point(const scalar_t* __restrict__ image, int C, int row,
                                             const PointCorners<T>& pc, T (&acc)[V * NV]) {
  const int first = pc.base * C;
  if constexpr (kTogether) {
    static_assert(sizeof(scalar_t) * V * NV <= sizeof(kZeroCorner), "kZeroCorner is too small");
    const scalar_t* zeros = reinterpret_cast<const scalar_t*>(kZeroCorner);
    Vec<scalar_t, V> loaded[4][NV];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const scalar_t* corner = (pc.inside >> q & 1) ? image + corner_offset(first, q, C, row) : zeros;
#pragma unroll
      for (int u = 0; u < NV; ++u) loaded[q][u] = load_vec<scalar_t, V>(corner + u * V);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int u = 0; u < NV; ++u) add_weighted(loaded[q][u], pc.weight[q], acc + u * V);
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (!(pc.inside >> q & 1)) continue;
      const int offset = corner_offset(first, q, C, row);
#pragma unroll
      for (int u = 0; u < NV; ++u) {
        add_weighted(load_vec<scalar_t, V>(image + offset + u * V), pc.weight[q], acc + u * V);
      }
    }
  }
}

// KH and KW > 0 fix the kernel size at compile time (the common 3x3), so the point loop unrolls and the
// loads of several points can be in flight together; 0 reads it from p. kTogether: see gather_point.
template <typename scalar_t, int V, int KH, int KW, int NV, bool kTogether = false>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dcnv4_forward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                         scalar_t* __restrict__ output, const DCNv4Params p, const TileShape t,
                         const int vecs) {
  using acc_t = at::opmath_type<scalar_t>;
  const ThreadPlace at = thread_place(p, t);
  if (!at.inside || at.vec >= vecs) return;
  const int kernel_h = KH > 0 ? KH : p.kernel_h, kernel_w = KW > 0 ? KW : p.kernel_w;
  const int C = static_cast<int>(p.channels), K = p.points;
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const int channel = at.g * p.group_channels + at.vec * (V * NV);
  const int out_pixel = at.yo * static_cast<int>(p.out_width) + at.xo;
  const int64_t out_image = static_cast<int64_t>(at.n) * p.out_height * p.out_width;
  const scalar_t* om = offset_mask + out_image * p.om_channels + out_pixel * static_cast<int>(p.om_channels) +
                       at.g * 3 * K;
  const scalar_t* image = value + static_cast<int64_t>(at.n) * H * W * C + channel;
  const int row = W * C;
  const auto centre = window_centre<acc_t>(p, at.yo, at.xo);
  const int centre_point = (kernel_w / 2) * kernel_h + kernel_h / 2;

  acc_t acc[V * NV];
#pragma unroll
  for (int e = 0; e < V * NV; ++e) acc[e] = acc_t(0);
  bool nan_point = false;
#pragma unroll
  for (int i = 0; i < kernel_w; ++i) {
#pragma unroll
    for (int j = 0; j < kernel_h; ++j) {
      const int grid_point = i * kernel_h + j;
      if (p.remove_center && grid_point == centre_point) continue;
      const int k = grid_point - (p.remove_center && grid_point > centre_point ? 1 : 0);
      const auto pos =
          sampling_position<KH, KW>(p, centre, i, j, static_cast<acc_t>(om[2 * k]), static_cast<acc_t>(om[2 * k + 1]));
      const auto pc = point_corners<acc_t>(pos.y, pos.x, static_cast<acc_t>(om[2 * K + k]), H, W);
      nan_point |= pc.inside == kNanPoint;
      gather_point<scalar_t, V, NV, kTogether>(image, C, row, pc, acc);
    }
  }
  if (nan_point) {
#pragma unroll
    for (int e = 0; e < V * NV; ++e) acc[e] = NAN;
  }
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    store_from_acc<scalar_t, V>(output + out_image * C + out_pixel * C + channel + u * V, acc + u * V);
  }
}

template <typename scalar_t, int V, int KH, int KW, int NV = 1, bool kTogether = false>
void launch_forward(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output, const DCNv4Params& p,
                    cudaStream_t stream) {
  const int vecs = p.group_channels / (V * NV);  // per thread: NV vectors of V channels
  const int lanes = std::min(vecs, kThreadsPerBlock);
  const int chunks = (vecs + lanes - 1) / lanes;
  const TileShape t = make_tile_shape(p, lanes, chunks, group_span_for(p, lanes, chunks));
  const int64_t out_image = p.out_height * p.out_width;
  for_each_batch_slice(p.batch, [&](int64_t first, int64_t count) {
    const dim3 grid = tile_grid(t, p, count);
    dcnv4_forward_kernel<scalar_t, V, KH, KW, NV, kTogether><<<grid, t.threads, 0, stream>>>(
        value + first * p.height * p.width * p.channels, offset_mask + first * out_image * p.om_channels,
        output + first * out_image * p.channels, p, t, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The 3x3 fast path. Every thread of a pixel needs the same point geometry (corner indices and
// bilinear weights times m); instead of each thread recomputing it, the block computes it once per
// (pixel, point) into shared memory, then each thread gathers its 16-byte channel vectors.
using PointGeometry = PointCorners<float>;
constexpr PointGeometry kNoPoint = {0, 0, {0.f, 0.f, 0.f, 0.f}};  // contributes nothing
constexpr int kMaxSharedPixels = 128;  // 128 pixels x 9 points x 24 bytes = 27 KB of shared memory

// The geometry of point k (0 <= k < p.points) of the window at `centre`, whose (pixel, group) offsets and
// weights start at `om`.
template <int KH, int KW, typename scalar_t>
__device__ __forceinline__ PointGeometry point_geometry(const DCNv4Params& p, const scalar_t* __restrict__ om,
                                                        const WindowOrigin<float>& centre, int k, int H, int W) {
  const SamplePoint sp = sample_point<KH, KW>(p, om, centre, k);
  return point_corners<float>(sp.y, sp.x, sp.m, H, W);
}

template <typename scalar_t, int V, int KH, int KW>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dcnv4_forward_shared_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                                scalar_t* __restrict__ output, const DCNv4Params p, const TileShape t) {
  constexpr int K_MAX = KH * KW;
  __shared__ PointGeometry geometry[kMaxSharedPixels * K_MAX];
  const int K = p.points, C = static_cast<int>(p.channels);
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const int row = W * C;
  const int g = blockIdx.y, n = blockIdx.z;
  const int tile_y = blockIdx.x / t.tiles_x, tile_x = blockIdx.x - tile_y * t.tiles_x;
  const int pixels = t.tile_h * t.tile_w;
  const int64_t out_image = static_cast<int64_t>(n) * p.out_height * p.out_width;

  // Phase 1: the geometry of every (pixel, point) of the tile, consecutive threads on consecutive points.
  for (int e = threadIdx.x; e < pixels * K; e += blockDim.x) {
    const int local = e / K, k = e - local * K;
    const int yo = tile_y * t.tile_h + local / t.tile_w, xo = tile_x * t.tile_w + local % t.tile_w;
    PointGeometry pg = kNoPoint;
    if (yo < p.out_height && xo < p.out_width) {
      const scalar_t* om = offset_mask + out_image * p.om_channels +
                           (yo * static_cast<int>(p.out_width) + xo) * static_cast<int>(p.om_channels) + g * 3 * K;
      pg = point_geometry<KH, KW>(p, om, window_centre<float>(p, yo, xo), k, H, W);
    }
    geometry[e] = pg;
  }
  __syncthreads();

  // Phase 2: each thread accumulates its channel vector over the points.
  const int vec = threadIdx.x % t.lanes, local = threadIdx.x / t.lanes;
  const int yo = tile_y * t.tile_h + local / t.tile_w, xo = tile_x * t.tile_w + local % t.tile_w;
  if (local >= pixels || yo >= p.out_height || xo >= p.out_width) return;
  const int channel = g * p.group_channels + vec * V;
  const scalar_t* image = value + static_cast<int64_t>(n) * H * W * C + channel;
  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  bool nan_point = false;
  const PointGeometry* mine = geometry + local * K;
#pragma unroll
  for (int k = 0; k < K_MAX; ++k) {
    if (k >= K) break;
    const PointGeometry pg = mine[k];
    nan_point |= pg.inside == kNanPoint;
    gather_point<scalar_t, V, 1>(image, C, row, pg, acc);
  }
  if (nan_point) {
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = NAN;
  }
  store_from_acc<scalar_t, V>(output + (out_image + yo * p.out_width + xo) * C + channel, acc);
}

// The 3x3 forward with LANES threads per (pixel, group): the lanes compute the geometry of different
// points (lane l: points l, l + LANES, ...) and pass it to each other by warp shuffles, instead of every
// lane computing all nine. The launch and the accumulation order are those of dcnv4_forward_kernel, so
// the output is the same bit for bit. Used for fp32 with 16 or 32 channels a group (4 or 8 lanes), where
// the forward is bound by instruction issue; measured on an H200: T224 s1 0.177 -> 0.161 ms, T det s4
// 0.027 -> 0.023; at 32 channels 3-10 % faster than the shared-memory geometry. With 2 or 4 lanes of
// fp16/bf16 it was slower than two vectors a thread, also with a point's loads together (docs/dcnv4_op.md).
template <typename scalar_t, int V, int LANES, bool kTogether = false>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dcnv4_forward_split_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                               scalar_t* __restrict__ output, const DCNv4Params p, const TileShape t) {
  constexpr int K_MAX = 9;
  const ThreadPlace at = thread_place(p, t);
  // Threads past the map's edge stay to take part in the shuffles; they read and write nothing.
  const bool active = at.inside;
  const int yo = active ? at.yo : 0, xo = active ? at.xo : 0;
  const int K = p.points, C = static_cast<int>(p.channels);
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const int row = W * C;
  const int channel = at.g * p.group_channels + at.lane * V;
  const int out_pixel = yo * static_cast<int>(p.out_width) + xo;
  const int64_t out_image = static_cast<int64_t>(at.n) * p.out_height * p.out_width;
  const scalar_t* om = offset_mask + out_image * p.om_channels + out_pixel * static_cast<int>(p.om_channels) +
                       at.g * 3 * K;
  const scalar_t* image = value + static_cast<int64_t>(at.n) * H * W * C + channel;
  const auto centre = window_centre<float>(p, yo, xo);
  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  bool nan_point = false;
#pragma unroll
  for (int first = 0; first < K_MAX; first += LANES) {
    PointGeometry mine = kNoPoint;
    if (active && first + at.lane < K) mine = point_geometry<3, 3>(p, om, centre, first + at.lane, H, W);
#pragma unroll
    for (int src = 0; src < LANES; ++src) {
      if (first + src >= K) break;
      PointGeometry pg;
      pg.base = __shfl_sync(0xffffffffu, mine.base, src, LANES);
      pg.inside = __shfl_sync(0xffffffffu, mine.inside, src, LANES);
#pragma unroll
      for (int q = 0; q < 4; ++q) pg.weight[q] = __shfl_sync(0xffffffffu, mine.weight[q], src, LANES);
      nan_point |= pg.inside == kNanPoint;
      gather_point<scalar_t, V, 1, kTogether>(image, C, row, pg, acc);
    }
  }
  if (nan_point) {
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = NAN;
  }
  if (active) store_from_acc<scalar_t, V>(output + out_image * C + out_pixel * C + channel, acc);
}

template <typename scalar_t, int V, int LANES, bool kTogether = false>
void launch_forward_split(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output,
                          const DCNv4Params& p, cudaStream_t stream) {
  const TileShape t = make_tile_shape(p, LANES, 1, group_span_for(p, LANES, 1));
  const int64_t out_image = p.out_height * p.out_width;
  for_each_batch_slice(p.batch, [&](int64_t first, int64_t count) {
    const dim3 grid = tile_grid(t, p, count);
    dcnv4_forward_split_kernel<scalar_t, V, LANES, kTogether><<<grid, t.threads, 0, stream>>>(
        value + first * p.height * p.width * p.channels, offset_mask + first * out_image * p.om_channels,
        output + first * out_image * p.channels, p, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, int V>
void launch_forward_shared(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output,
                           const DCNv4Params& p, cudaStream_t stream) {
  const int vecs = p.group_channels / V;
  TileShape t = make_tile_shape(p, vecs, 1);
  if (t.tile_h * t.tile_w > kMaxSharedPixels) {  // at most kMaxSharedPixels pixels: halve the tile's height
    t.tile_h = kMaxSharedPixels / t.tile_w;
    t.tiles_x = static_cast<int>((p.out_width + t.tile_w - 1) / t.tile_w);
    t.tiles = t.tiles_x * static_cast<int>((p.out_height + t.tile_h - 1) / t.tile_h);
    t.threads = t.lanes * t.tile_h * t.tile_w;
  }
  const int64_t out_image = p.out_height * p.out_width;
  for_each_batch_slice(p.batch, [&](int64_t first, int64_t count) {
    const dim3 grid = tile_grid(t, p, count);
    dcnv4_forward_shared_kernel<scalar_t, V, 3, 3><<<grid, t.threads, 0, stream>>>(
        value + first * p.height * p.width * p.channels, offset_mask + first * out_image * p.om_channels,
        output + first * out_image * p.channels, p, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The 3x3 forward with the tile's input region staged in shared memory. A block takes a tile of up to 64
// output pixels (8 x 8 on most maps; staged_tile) and as many groups as fill a 128-byte row (4 groups of 16
// fp16 channels, 2 of 32, ...). Its windows, plus a margin of learned offset, fall on a region of input
// pixels (17 x 17 for an 8 x 8 tile), which the block first copies into shared memory (whole 128-byte rows,
// zeros outside the image); the gathers then read shared memory instead of L1, where a warp's 16-byte corner
// loads touch one cache line per thread and bound the other kernels (ncu, T224 s2 fp16: L1/TEX throughput
// 84 % -> 48 %, 60.9 -> 51.6 us; docs/dcnv4_op.md). From shared memory, 8 threads reading the 8 distinct 16-byte
// columns of their rows take one wavefront whatever the rows. With two vectors a thread (4 threads a pixel),
// the threads of odd pixels read their vectors in the other order, so that the 8 threads of a quarter warp
// (two pixels) still read 8 distinct columns. Points whose corners leave the region (offsets past the margin)
// read the image through L1 as before. Same sums in the same order as dcnv4_forward_kernel: the output is the
// same bit for bit. On sm_90 one thread has the copy engine (TMA) copy the whole region: the copy loop had
// cost every thread 24 instructions per 16 bytes, 12 % of the kernel's instructions and 17 % of its stall
// samples (ncu, 64x28x28x256 fp16); with the copy engine, outputs equal bit for bit, measured on an H200:
// that row 0.0914 -> 0.0842 ms, T224 s1 fp32 0.1325 -> 0.1215, 64x56x56x128 fp32 0.2125 -> 0.1926
// (docs/dcnv4_op.md). In the same copy it brings the tile's offsets and weights into shared memory
// (kStagedOffsets), where the threads read them instead of from global memory: their long-scoreboard waits
// had been 10 % of the stall samples (ncu, 64x28x28x256 fp16). Measured on an H200, outputs equal bit for
// bit: T224 s1 fp32 0.1257 -> 0.0878 ms, T det s1 fp32 0.0889 -> 0.0631, T224 s2 fp16 0.0478 -> 0.0444
// (docs/dcnv4_op.md).
constexpr int kStagedPixels = 64;     // a tile's output pixels at most
constexpr int kStagedMinSide = 8;     // maps smaller than this either way take the other kernels
constexpr int kStagedRowBytes = 128;  // a region pixel: the block's groups' channels
constexpr int kStagedColumns = kStagedRowBytes / 16;
constexpr int kStagedMargin = 3;      // learned offsets (before offset_scale) up to this many pixels
constexpr int kStagedBarrierBytes = 16;  // the copy engine's barrier, after the region (and offsets)
constexpr int kStagedMaxCells = (48 * 1024 - kStagedBarrierBytes) / kStagedRowBytes;  // 48 KB in all
constexpr int kStagedThreadsPerPixel = kStagedRowBytes / 32;  // two 16-byte vectors a thread
constexpr int kStagedThreads = kStagedPixels * kStagedThreadsPerPixel;  // a block's threads at most

// Two 16-byte vectors a thread: 4 threads a (pixel, 128-byte row), 8 pixels a warp, row by row in the tile.
template <typename scalar_t, int V, bool kStagedOffsets, bool kRemoveCenter>
__global__ void __launch_bounds__(kStagedThreads, 4)
    dcnv4_forward_staged_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                                scalar_t* __restrict__ output, const DCNv4Params p, const TileShape t,
                                const TileRegion r, const __grid_constant__ cuda_tma::RegionMap region_map,
                                const __grid_constant__ cuda_tma::RegionMap offsets_map, const int offsets_row,
                                const bool copy_engine, const int first_image) {
  constexpr int NV = 2;
  // [cell][column]: 16 bytes of the block's channels of a region pixel; if kStagedOffsets, the tile's offsets
  // and weights, [pixel][offsets_row] from channel first_group * 3K rounded down to 16 bytes; then the copy
  // engine's barrier
  extern __shared__ __align__(128) uint4 region[];
  constexpr int K = kRemoveCenter ? 8 : 9;
  const int C = static_cast<int>(p.channels);
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const int D = p.group_channels;
  const int tile_y = blockIdx.x / t.tiles_x, tile_x = blockIdx.x - tile_y * t.tiles_x;
  const int first_group = blockIdx.y * t.group_span;
  const scalar_t* image = value + static_cast<int64_t>(blockIdx.z) * H * W * C;
  const int tile_y0 = tile_y * t.tile_h, tile_x0 = tile_x * t.tile_w;
  const RegionOrigin origin = region_origin(p, r, tile_y0, tile_x0);
  const int region_y = origin.y, region_x = origin.x;

  const int region_bytes = r.rows * r.cols * kStagedRowBytes;
  scalar_t* staged_offsets = reinterpret_cast<scalar_t*>(region + r.rows * r.cols * kStagedColumns);
  const int offsets_bytes = kStagedOffsets ? t.tile_h * t.tile_w * offsets_row * sizeof(scalar_t) : 0;
  // The block's first offset channel, rounded down to 16 bytes (see staged_offsets_row).
  const int offsets_start = staged_offsets_start(first_group * 3 * K, sizeof(scalar_t));
  if (kStagedOffsets || copy_engine) {
    auto* barrier = reinterpret_cast<unsigned long long*>(reinterpret_cast<char*>(staged_offsets) + offsets_bytes);
    const int image = first_image + blockIdx.z;
    cuda_tma::arm_barrier(barrier, region_bytes + offsets_bytes);
    if (threadIdx.x == 0) {
      cuda_tma::copy_box(region, &region_map, barrier, first_group * D, region_x, region_y, image);
      if (kStagedOffsets) {
        cuda_tma::copy_box(staged_offsets, &offsets_map, barrier, offsets_start, tile_x0, tile_y0, image);
      }
    }
    cuda_tma::wait_region(barrier);
  } else {
    stage_region<kStagedColumns>(region, image + first_group * D, r.rows, r.cols, region_y, region_x, H, W, C);
    wait_copies();
    __syncthreads();
  }

  // lane, group, then pixel; the tile's pixels row by row, 8 a warp. A pixel's kStagedThreadsPerPixel threads
  // are t.lanes (1, 2 or 4) threads for each of t.group_span groups (shifts and masks instead of divisions by
  // run-time values); one division places the pixel in the tile.
  const int pixel_thread = threadIdx.x % kStagedThreadsPerPixel, lanes_log2 = t.lanes >> 1;
  const int lane = pixel_thread & (t.lanes - 1);
  const int local = threadIdx.x / kStagedThreadsPerPixel, g = first_group + (pixel_thread >> lanes_log2);
  const int ty = local / t.tile_w, tx = local - ty * t.tile_w;
  const int yo = tile_y0 + ty, xo = tile_x0 + tx;
  if (local >= t.tile_h * t.tile_w || yo >= p.out_height || xo >= p.out_width) return;
  // Odd pixels take their vectors in the other order (see above): acc[u * V + e] holds vector u ^ flip.
  const int flip = local & 1;
  const int channel = g * D + lane * (V * NV);
  const int out_pixel = yo * static_cast<int>(p.out_width) + xo;
  const int64_t out_image = static_cast<int64_t>(blockIdx.z) * p.out_height * p.out_width;
  const scalar_t* om =
      kStagedOffsets ? staged_offsets + g * 3 * K - offsets_start + (ty * t.tile_w + tx) * offsets_row
                     : offset_mask + out_image * p.om_channels + out_pixel * static_cast<int>(p.om_channels) +
                           g * 3 * K;
  const scalar_t* lane_image = image + channel;
  const int image_row = W * C;
  // Shared addresses in bytes: this thread's first vector in cell 0, its second one `second` further, a
  // cell to the right kStagedRowBytes, a region row down `cell_row`.
  const char* mine = reinterpret_cast<const char*>(region + ((g - first_group) * t.lanes + lane) * NV + flip);
  const int second = flip ? -16 : 16;
  const int cell_row = r.cols * kStagedRowBytes;
  const auto centre = window_centre<float>(p, yo, xo);

  float acc[V * NV];
#pragma unroll
  for (int e = 0; e < V * NV; ++e) acc[e] = 0.f;
  bool nan_point = false;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const SamplePoint sp = sample_point<3, 3, kRemoveCenter>(p, om, centre, k);
    // A point inside the region needs only its cell and its weights: the region holds zeros outside the
    // image, so the per-corner inside-the-image flags and the flat image index of point_corners are left to
    // the points past the margin. (With them, the staged forward issued about 234 instructions a point
    // and thread at fp16 with 32 channels, ncu at 64x28x28x256; without, measured on an H200, outputs equal
    // bit for bit: that row 0.0949 -> 0.0884 ms, bf16 0.0946 -> 0.0849, T224 s2 fp16 0.0525 -> 0.0493.)
    const float fy = floorf(sp.y), fx = floorf(sp.x);
    const int cy = static_cast<int>(fy) - region_y, cx = static_cast<int>(fx) - region_x;
    const bool used = point_used(sp.y, sp.x, H, W);
    if (used && static_cast<unsigned>(cy) < static_cast<unsigned>(r.rows - 1) &&
        static_cast<unsigned>(cx) < static_cast<unsigned>(r.cols - 1)) {
      float weight[4];  // those of point_corners (the output is that of the other kernels)
      point_weights(sp.y, sp.x, fy, fx, sp.m, weight);
      const char* top = mine + (cy * r.cols + cx) * kStagedRowBytes;
      const char* bottom = top + cell_row;
      const char* corners[4] = {top, top + kStagedRowBytes, bottom, bottom + kStagedRowBytes};
      Vec<scalar_t, V> loaded[4][NV];  // all eight loads before the first use
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        loaded[q][0] = *reinterpret_cast<const Vec<scalar_t, V>*>(corners[q]);
        loaded[q][1] = *reinterpret_cast<const Vec<scalar_t, V>*>(corners[q] + second);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int u = 0; u < NV; ++u) add_weighted(loaded[q][u], weight[q], acc + u * V);
      }
    } else if (used) {  // an offset past the margin: the corners from the image, through L1
      const PointCorners<float> pc = point_corners<float>(sp.y, sp.x, sp.m, H, W);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (!(pc.inside >> q & 1)) continue;
        const int offset = corner_offset(pc.base * C, q, C, image_row);
#pragma unroll
        for (int u = 0; u < NV; ++u) {
          add_weighted(load_vec<scalar_t, V>(lane_image + offset + (u ^ flip) * V), pc.weight[q], acc + u * V);
        }
      }
    } else {  // outside the image (contributes nothing), or NaN (poisons the pixel), as in point_corners
      nan_point |= isnan(sp.x) || isnan(sp.y);
    }
  }
  if (nan_point) {
#pragma unroll
    for (int e = 0; e < V * NV; ++e) acc[e] = NAN;
  }
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    store_from_acc<scalar_t, V>(output + out_image * C + out_pixel * C + channel + (u ^ flip) * V, acc + u * V);
  }
}

// The staged forward's tile (at most kStagedPixels output pixels) and its region: the shape that covers the
// output map with the fewest warps, then the fewest region cells. A tile's pixels fill its warps row by row,
// 8 a warp, so a tile cut by the map's edge, or one whose pixels do not fill its last warp, idles threads that
// hold their block's registers and shared memory: on a 28 x 28 map, 8 x 8 tiles give 16 blocks of 8 warps for
// 98 warps' worth of pixels, where 4 x 14 tiles give 14 blocks of 7 full warps. Against 8 x 8 tiles of 4 x 2
// pixels a warp, measured on an H200 (outputs equal bit for bit): T224 s2 64x28x28x128 fp32 0.0530 -> 0.0492
// ms, fp16 0.0438 -> 0.0416; 64x28x28x256 fp16 0.0765 -> 0.0715; T det s4 2x25x42x512 fp32 0.0179 -> 0.0159;
// FlashInternImage-L stage 4 2x25x42x1280 fp16 0.0257 -> 0.0240; maps of multiples of 8 level
// (docs/dcnv4_op.md). Candidates: for_each_tile_shape. False when no candidate's region fits kStagedMaxCells.
inline bool staged_tile(const DCNv4Params& p, TileShape& t, TileRegion& r) {
  int64_t best_warps = 0, best_cells = 0;
  for_each_tile_shape(p, kStagedPixels, [&](int tile_h, int tile_w, int64_t tiles_x, int64_t tiles) {
    const TileRegion region = tile_region(p, tile_h, tile_w, kStagedMargin);
    if (region.rows * region.cols > kStagedMaxCells) return;
    const int tile_warps = (tile_h * tile_w + 7) / 8;
    const int64_t warps = tiles * tile_warps, cells = tiles * region.rows * region.cols;
    if (best_warps == 0 || warps < best_warps || (warps == best_warps && cells < best_cells)) {
      best_warps = warps;
      best_cells = cells;
      t.tile_h = tile_h;
      t.tile_w = tile_w;
      t.tiles_x = static_cast<int>(tiles_x);
      t.tiles = static_cast<int>(tiles);  // < 2^31: the map's pixels are (check_image_fits)
      t.threads = tile_warps * 8 * kStagedThreadsPerPixel;
      r = region;
    }
  });
  return best_warps > 0;
}

// Runs the staged forward when it applies: a 3x3 kernel; fp32, fp16 or bf16; a group of 32, 64 or 128 bytes
// (two 16-byte vectors a thread, 1 to 4 threads a group) whose 128-byte rows of groups divide the channels;
// 16-byte aligned tensors; a region of at most kStagedMaxCells pixels; and an output map of at least 8 x 8
// pixels (a smaller map leaves part of every block idle). Whatever the batch, so the choice does not depend on
// it (its output is that of the other kernels bit for bit anyway): with the region and the offsets staged by
// the copy engine it is also faster on problems under a wave of the device, where a rule of at least 1.25
// waves had kept it off (measured on an H200, outputs equal bit for bit: FlashInternImage-L stage 4
// 2x25x42x1280 bf16 0.0332 -> 0.0250 ms, fp16 0.0310 -> 0.0253; T det s4 2x25x42x512 fp16 0.0204 -> 0.0154;
// 1x25x40x1024 fp32 0.0197 -> 0.0154; no row slower beyond noise; docs/dcnv4_op.md).
template <typename scalar_t>
bool try_forward_staged(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output, const DCNv4Params& p,
                        cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    constexpr int kV = 16 / sizeof(scalar_t);
    const int group_bytes = p.group_channels * static_cast<int>(sizeof(scalar_t));
    if (p.kernel_h != 3 || p.kernel_w != 3 || kStagedRowBytes % group_bytes != 0 || group_bytes < 32 ||
        !vector_fits<scalar_t, kV>(p.group_channels, {value, output})) {
      return false;
    }
    const int span = kStagedRowBytes / group_bytes;
    if (p.group % span != 0 || p.group / span >= 65536 || p.out_height < kStagedMinSide ||
        p.out_width < kStagedMinSide) {
      return false;
    }
    TileShape t;
    TileRegion r;
    if (!staged_tile(p, t, r)) return false;
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    t.lanes = group_bytes / 32;
    t.chunks = 1;
    t.group_span = span;
    const int64_t out_image = p.out_height * p.out_width;
    // On sm_90 the copy engine stages each region (one descriptor for the whole batch) and, where each
    // pixel's offset_mask row is a multiple of 16 bytes (the layers pad it to 8 channels), the tile's offsets
    // and weights of the block's groups. Elsewhere, or if the driver refuses a descriptor, the block's threads
    // copy the region (stage_region), and the offsets are read from global memory.
    cuda_tma::RegionMap region_map{}, offsets_map{};
    const bool copy_engine =
        cuda_tma::encode_region_map(&region_map, device, value, sizeof(scalar_t), p.batch, p.height, p.width,
                                    p.channels, kStagedRowBytes / sizeof(scalar_t), r.cols, r.rows);
    const int offsets_row = staged_offsets_row(span * 3 * p.points, sizeof(scalar_t));
    const bool staged_offsets =
        copy_engine &&
        encode_offsets_map(&offsets_map, device, offset_mask, sizeof(scalar_t), p, offsets_row, t.tile_h,
                           t.tile_w);
    const size_t shared = static_cast<size_t>(kStagedRowBytes) * r.rows * r.cols + kStagedBarrierBytes +
                          (staged_offsets ? sizeof(scalar_t) * t.tile_h * t.tile_w * offsets_row : 0);
    constexpr int kMostShared = kStagedRowBytes * kStagedMaxCells + kStagedBarrierBytes +
                                kStagedPixels * staged_offsets_row(4 * 3 * 9, sizeof(scalar_t)) *
                                    static_cast<int>(sizeof(scalar_t));
    // remove_center fixed at compile time: each unrolled point's grid position and weight index are constants
    // (measured on an H200, outputs equal bit for bit: T224 s2 fp16 0.0445 -> 0.0428 ms, 64x28x28x256 fp16
    // 0.0773 -> 0.0748, bf16 0.0746 -> 0.0722; fp32 level to 2.5 % faster; docs/dcnv4_op.md)
    auto pick = [&](auto remove_center) {
      constexpr bool kRemoveCenter = decltype(remove_center)::value;
      if (staged_offsets) {  // may pass 48 KB: opt in to the most the kernel can ask for
        cuda_buffers::allow_dynamic_shared<dcnv4_forward_staged_kernel<scalar_t, kV, true, kRemoveCenter>,
                                           kMostShared>(device);
        return dcnv4_forward_staged_kernel<scalar_t, kV, true, kRemoveCenter>;
      }
      return dcnv4_forward_staged_kernel<scalar_t, kV, false, kRemoveCenter>;
    };
    const auto kernel = p.remove_center ? pick(std::true_type{}) : pick(std::false_type{});
    for_each_batch_slice(p.batch, [&](int64_t first, int64_t count) {
      const dim3 grid = tile_grid(t, p, count);
      kernel<<<grid, t.threads, shared, stream>>>(
          value + first * p.height * p.width * p.channels, offset_mask + first * out_image * p.om_channels,
          output + first * out_image * p.channels, p, t, r, region_map, offsets_map, offsets_row, copy_engine,
          static_cast<int>(first));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return true;
  }
}

// Two 16-byte vectors per thread (fp16/bf16, 16 or 32 channels per group: 1 or 2 threads per (pixel, group)
// instead of 2 or 4). The forward is bound by instruction issue (docs/dcnv4_op.md), and every thread of a
// (pixel, group) issues the same point geometry; with two vectors a thread issues it for twice the
// channels. It costs registers (64 instead of 48 at fp16, 80 at bf16, so half the SM's threads or less
// instead of three quarters), so it is taken only when the problem still fills at least two waves of the
// device (of the kernel that runs). Measured on an H200: T224 s1 fp16 0.119 -> 0.107 ms, 64x56x56x128
// fp16 0.227 -> 0.183; FlashInternImage-L stage 4 (2x25x42, 80 groups, 1.2 waves) got slower, 0.037 ->
// 0.044; fp32 got slower at 16 channels.
template <typename scalar_t, int V>
bool two_vectors_fill_device(const DCNv4Params& p) {
  const int vecs = p.group_channels / V;
  if (vecs != 2 && vecs != 4) return false;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t wave = cuda_buffers::cached_per_device(device, [](int d) {
    return cuda_buffers::kernel_wave_threads(d, dcnv4_forward_kernel<scalar_t, V, 3, 3, 2, true>, kThreadsPerBlock, 0);
  });
  const int64_t threads = p.batch * p.out_height * p.out_width * p.group * (vecs / 2);
  return threads >= 2 * wave;
}

// Instantiates only what is used: fp64 (for gradcheck) and channel counts that allow no 16-byte vectors
// take the generic kernel; the others get 16-byte vectors, and 3x3 the staged kernel where it applies
// (try_forward_staged), else one of the kernels that share a point's geometry (shuffles, shared
// memory) or give a thread two vectors. The 3x3 fp16/bf16 kernels and fp32 with 4 lanes issue a point's
// loads together (measured on an H200, outputs equal bit for bit: T224 s3 fp16 0.0403 -> 0.0330 ms,
// 64x56x56x128 bf16 0.1879 -> 0.1712, T224 s1 fp32 0.1549 -> 0.1483); fp32 with 8 lanes does not (it
// got slower: 64x28x28x256 0.1419 -> 0.1560).
template <typename scalar_t>
void dispatch_forward(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output, const DCNv4Params& p,
                      cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  const bool wide = pick_vector_width<scalar_t>(p.group_channels, {value, output}) == kWide;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    // Sharing the geometry pays when at least 4 threads would recompute it: fp32 with 16 or 32 channels a
    // group passes it by shuffles (split kernel; at 32 channels 3-10 % faster than through shared memory,
    // measured on an H200), wider groups through shared memory (at 2-4 lanes that was 5-35 % slower: the
    // barrier and the extra pass dominate).
    const int lanes = p.group_channels / kWide;
    if (wide && try_forward_staged<scalar_t>(value, offset_mask, output, p, stream)) return;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (wide && p.kernel_h == 3 && p.kernel_w == 3 && lanes == 8) {
        return launch_forward_split<scalar_t, kWide, 8>(value, offset_mask, output, p, stream);
      }
    }
    if (wide && p.kernel_h == 3 && p.kernel_w == 3 && lanes >= 8 && lanes <= kThreadsPerBlock &&
        std::is_same_v<at::opmath_type<scalar_t>, float>) {
      return launch_forward_shared<scalar_t, kWide>(value, offset_mask, output, p, stream);
    }
    if (wide && p.kernel_h == 3 && p.kernel_w == 3) {
      if constexpr (sizeof(scalar_t) == 2) {
        if (two_vectors_fill_device<scalar_t, kWide>(p)) {
          return launch_forward<scalar_t, kWide, 3, 3, 2, true>(value, offset_mask, output, p, stream);
        }
        return launch_forward<scalar_t, kWide, 3, 3, 1, true>(value, offset_mask, output, p, stream);
      } else {  // fp32
        if (lanes == 4) return launch_forward_split<scalar_t, kWide, 4, true>(value, offset_mask, output, p, stream);
        return launch_forward<scalar_t, kWide, 3, 3>(value, offset_mask, output, p, stream);
      }
    }
    if (wide) return launch_forward<scalar_t, kWide, 0, 0>(value, offset_mask, output, p, stream);
  }
  launch_forward<scalar_t, 1, 0, 0>(value, offset_mask, output, p, stream);
}

at::Tensor dcnv4_forward_cuda(const at::Tensor& value_in, const at::Tensor& offset_mask_in, int64_t kernel_h,
                              int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w, int64_t group, double offset_scale,
                              bool remove_center) {
  const auto p = make_dcnv4_params(value_in, offset_mask_in, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                   pad_w, dilation_h, dilation_w, group, offset_scale, remove_center);
  check_image_fits(p);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  at::Tensor output = at::empty({p.batch, p.out_height, p.out_width, p.channels}, value.options());
  if (output.numel() == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_forward_cuda", [&] {
    dispatch_forward<scalar_t>(value.const_data_ptr<scalar_t>(), offset_mask.const_data_ptr<scalar_t>(),
                               output.mutable_data_ptr<scalar_t>(), p, stream);
  });
  return output;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) { m.impl("dcnv4_forward", &cuda::dcnv4_forward_cuda); }

}  // namespace mmdcnv4
