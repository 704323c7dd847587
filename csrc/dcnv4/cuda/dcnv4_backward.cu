// DCNv4 backward on CUDA.
//
// Mapping: 2-D tiles of output pixels of one image and a span of groups per block (dcnv4_cuda.cuh), T
// lanes (a power of two <= 32, inside one warp) per (pixel, group); lane l handles the channel vectors
// l, l + T, ... Per point, each lane forms partial sums of the weight and offset gradients over its
// channels; a butterfly of warp shuffles reduces them over the T lanes and lane 0 writes them, so those
// gradients need no atomics and are deterministic.
//
// The value gradient is a scatter (many output points hit one input pixel). In the plain kernel each
// lane adds its contributions with fp32 atomics, 16 bytes at a time on sm_90 (into the gradient itself
// for fp32/fp64, into an fp32 buffer rounded once at the end for fp16/bf16). 3x3 kernels with 16 or 32
// channels a group (the FlashInternImage and paper shapes) take the sorted kernel instead, which first
// sums a tile's contributions per input pixel in shared memory (see dcnv4_backward_sorted_kernel). With
// torch.use_deterministic_algorithms(True), contributions are instead rounded to 64-bit fixed point and
// added as integers, which are associative, so the result does not depend on the order of the additions
// (the plain kernel: one integer atomic per contribution and channel; the sorted kernel: a region pixel's
// integers summed in registers, then one atomic per channel; the same integers, so the same result bit for
// bit). The fixed-point scale is a power of two chosen on the device from max|grad_output| * max|weight| *
// (Ho * Wo * K) (a bound on any partial sum), which leaves more than 40 bits of precision below the largest
// possible contribution; it costs an int64 buffer (twice the fp32 one) and two reductions
// (common/fixed_point.cuh), and needs no host synchronisation. With the sorted kernel taking this mode and
// the scale computed by kernels instead of ATen ops, forward+backward went from 7-14x to 1.2-2.0x the
// default mode's time (docs/benchmarks/dcnv4_op_deterministic.md).
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "common/cuda_buffers.cuh"
#include "common/fixed_point.cuh"
#include "dcnv4/cuda/dcnv4_cuda.cuh"
#include "dcnv4/dcnv4_host.h"

namespace mmdcnv4 {
namespace cuda {
namespace {

template <typename acc_t>
struct FloatAtomicAdd {
  acc_t* base;
  template <int N>
  __device__ __forceinline__ void add(int64_t index, const acc_t* values) const {
    atomic_add_vec<N>(base + index, values);
  }
};

struct FixedPointAtomicAdd {
  unsigned long long* base;
  const double* scale;  // device scalar, see the file comment
  template <int N, typename acc_t>
  __device__ __forceinline__ void add(int64_t index, const acc_t* values) const {
    const double s = *scale;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      atomicAdd(base + index + e, static_cast<unsigned long long>(fixed_point::to_fixed(values[e], s)));
    }
  }
  // Adds N sums already in fixed point (the sorted kernel's per-pixel sums).
  template <int N>
  __device__ __forceinline__ void add_fixed(int64_t index, const long long* sums) const {
#pragma unroll
    for (int e = 0; e < N; ++e) atomicAdd(base + index + e, static_cast<unsigned long long>(sums[e]));
  }
};


template <typename acc_t>
__device__ __forceinline__ acc_t reduce_lanes(acc_t value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset, lanes);
  return value;
}

template <int V, typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t (&g)[V], const acc_t (&f)[V]) {
  acc_t s = 0;
#pragma unroll
  for (int e = 0; e < V; ++e) s += g[e] * f[e];
  return s;
}

// Corner q of a point: given s_q = grad_output . value_q over the thread's channels, its terms of the
// point's weight and offset gradients (the bilinear weight and derivatives times s_q).
template <typename acc_t>
__device__ __forceinline__ void add_corner_terms(acc_t s, acc_t weight, acc_t dx, acc_t dy, acc_t& grad_m,
                                                 acc_t& grad_x, acc_t& grad_y) {
  grad_m += weight * s;
  grad_x += dx * s;
  grad_y += dy * s;
}

// Reduces a point's weight and offset gradients over the pixel's lanes; the writer (lane 0) stores them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_point_gradients(acc_t grad_m, acc_t grad_x, acc_t grad_y, int lanes, bool writer,
                                                      bool nan_point, acc_t m, acc_t scale, scalar_t* gom, int k,
                                                      int K) {
  grad_m = reduce_lanes(grad_m, lanes);
  grad_x = reduce_lanes(grad_x, lanes);
  grad_y = reduce_lanes(grad_y, lanes);
  if (writer) {
    if (nan_point) grad_m = NAN;
    gom[2 * k] = static_cast<scalar_t>(grad_x * scale * m);
    gom[2 * k + 1] = static_cast<scalar_t>(grad_y * scale * m);
    gom[2 * K + k] = static_cast<scalar_t>(grad_m);
  }
}

// Corner q's share of the value gradient over the thread's V channels: w * grad_output, added at `index`.
template <int V, typename acc_t, typename Accumulate>
__device__ __forceinline__ void add_value_gradient(const Accumulate& accumulate, int64_t index, acc_t w,
                                                   const acc_t (&g)[V]) {
  acc_t contribution[V];
#pragma unroll
  for (int e = 0; e < V; ++e) contribution[e] = w * g[e];
  accumulate.template add<V>(index, contribution);
}

// The columns of a pixel's offset_mask past its groups' 3 * K values (padding) get a zero gradient; the
// kernels write every other element, so grad_offset_mask needs no zero-fill.
template <typename scalar_t>
__device__ __forceinline__ void zero_offset_padding(scalar_t* gom_pixel, const DCNv4Params& p) {
  for (int c = static_cast<int>(p.group) * 3 * p.points; c < p.om_channels; ++c) gom_pixel[c] = scalar_t(0);
}

// Per point and corner q, s_q = sum over the thread's channels of grad_output * value_q. The weight
// gradient is sum_q w_q s_q and the offset gradients are fixed combinations of the s_q (the bilinear
// derivative), so a channel costs one multiply-add per corner, plus its share of the value scatter.
template <typename scalar_t, int V, int KH, int KW, typename Accumulate>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dcnv4_backward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                          const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_offset_mask,
                          const Accumulate accumulate, const DCNv4Params p, const TileShape t,
                          const int vecs) {
  using acc_t = at::opmath_type<scalar_t>;
  const ThreadPlace at = thread_place(p, t);
  // Threads past the map's edge stay to take part in the shuffles; they read and write nothing.
  const bool active = at.inside;
  const int yo = active ? at.yo : 0, xo = active ? at.xo : 0;
  const int kernel_h = KH > 0 ? KH : p.kernel_h, kernel_w = KW > 0 ? KW : p.kernel_w;
  const int C = static_cast<int>(p.channels), K = p.points;
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const int channel0 = at.g * p.group_channels;
  const int out_pixel = yo * static_cast<int>(p.out_width) + xo;
  const int64_t out_image = static_cast<int64_t>(at.n) * p.out_height * p.out_width;
  const int64_t om_pixel = out_image * p.om_channels + out_pixel * static_cast<int>(p.om_channels);
  const int64_t om_offset = om_pixel + at.g * 3 * K;
  const scalar_t* om = offset_mask + om_offset;
  const int64_t image_offset = static_cast<int64_t>(at.n) * H * W * C;
  const scalar_t* image = value + image_offset + channel0;
  const scalar_t* gout = grad_output + out_image * C + out_pixel * C + channel0;
  const auto centre = window_centre<acc_t>(p, yo, xo);
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const int centre_point = (kernel_w / 2) * kernel_h + kernel_h / 2;

#pragma unroll
  for (int i = 0; i < kernel_w; ++i) {
#pragma unroll
    for (int j = 0; j < kernel_h; ++j) {
      const int grid_point = i * kernel_h + j;
      if (p.remove_center && grid_point == centre_point) continue;
      const int k = grid_point - (p.remove_center && grid_point > centre_point ? 1 : 0);
      acc_t x = 0, y = 0, m = 0;
      if (active) {
        const auto pos =
            sampling_position<KH, KW>(p, centre, i, j, static_cast<acc_t>(om[2 * k]), static_cast<acc_t>(om[2 * k + 1]));
        x = pos.x;
        y = pos.y;
        m = static_cast<acc_t>(om[2 * K + k]);
      }
      const auto c = bilinear_corners<acc_t, int>(y, x, H, W);
      acc_t grad_m = 0, grad_x = 0, grad_y = 0;
      if (active && c.used) {
        const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
        const acc_t dx_coef[4] = {-hy, hy, -c.ly, c.ly};
        const acc_t dy_coef[4] = {-hx, -c.lx, hx, c.lx};
        for (int vec = at.lane; vec < vecs; vec += t.lanes) {
          const int ch = vec * V;
          acc_t g[V];
          to_acc(load_vec<scalar_t, V>(gout + ch), g);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (c.index[q] < 0) continue;
            const int offset = c.index[q] * C + ch;
            acc_t f[V];
            to_acc(load_vec<scalar_t, V>(image + offset), f);
            add_corner_terms(dot<V>(g, f), c.weight[q], dx_coef[q], dy_coef[q], grad_m, grad_x, grad_y);
            add_value_gradient<V>(accumulate, image_offset + channel0 + offset, m * c.weight[q], g);
          }
        }
      }
      // A point outside the image gets zero offset gradients whatever its m (0 * NaN would not be zero).
      write_point_gradients(grad_m, grad_x, grad_y, t.lanes, active && at.lane == 0, !c.used && (isnan(x) || isnan(y)),
                            c.used ? m : acc_t(0), scale, grad_offset_mask + om_offset, k, K);
    }
  }
  if (active && at.lane == 0 && at.g == p.group - 1) zero_offset_padding(grad_offset_mask + om_pixel, p);
}

int lanes_for(int vecs) {
  int lanes = 1;
  while (lanes < vecs && lanes < 32) lanes *= 2;
  return lanes;
}

// A point's geometry as the backward needs it, computed by one lane and passed to the pixel's other
// lanes by shuffles (ShuffledPoint has no arrays, so it stays in registers).
struct ShuffledPoint {
  int y0, x0;  // top-left corner
  int flags;   // bit q: corner q inside the image; kPointUsed; kPointNan (see bilinear_corners)
  float lx, ly, m;
};
constexpr int kPointUsed = 1 << 4, kPointNan = 1 << 5;

// Point k of the window at `centre`, whose (pixel, group) offsets and weights start at `om`. Values as
// bilinear_corners computes them.
template <int KH, int KW, bool kRemoveCenter, typename scalar_t>
__device__ __forceinline__ ShuffledPoint shuffled_point(const DCNv4Params& p, const scalar_t* __restrict__ om,
                                                        const WindowOrigin<float>& centre, int k, int H, int W) {
  const SamplePoint sp = sample_point<KH, KW, kRemoveCenter>(p, om, centre, k);
  const float x = sp.x, y = sp.y;
  ShuffledPoint pt = {0, 0, 0, 0.f, 0.f, sp.m};
  if (!(y > -1.f && y < static_cast<float>(H) && x > -1.f && x < static_cast<float>(W))) {
    // Outside the image: zero offset gradients whatever m (0 * NaN would not be), no corners
    pt.m = 0.f;
    if (isnan(x) || isnan(y)) pt.flags = kPointNan;
    return pt;
  }
  const float fy = floorf(y), fx = floorf(x);
  pt.y0 = static_cast<int>(fy);
  pt.x0 = static_cast<int>(fx);
  pt.ly = y - fy;
  pt.lx = x - fx;
  pt.flags = kPointUsed | corners_inside(pt.y0, pt.x0, H, W);
  return pt;
}

__device__ __forceinline__ ShuffledPoint shuffle_point(const ShuffledPoint& mine, int src, int lanes) {
  ShuffledPoint pt;
  pt.y0 = __shfl_sync(0xffffffffu, mine.y0, src, lanes);
  pt.x0 = __shfl_sync(0xffffffffu, mine.x0, src, lanes);
  pt.flags = __shfl_sync(0xffffffffu, mine.flags, src, lanes);
  pt.lx = __shfl_sync(0xffffffffu, mine.lx, src, lanes);
  pt.ly = __shfl_sync(0xffffffffu, mine.ly, src, lanes);
  pt.m = __shfl_sync(0xffffffffu, mine.m, src, lanes);
  return pt;
}

// The 3x3 backward with the value gradient summed per block before it reaches global memory. A block
// takes a tile of up to 64 output pixels (8 x 8 on most maps; sorted_region) of one group. Neighbouring
// windows overlap, so an 8 x 8 tile's 64 x 9 x 4 corners land on a region of about 17 x 17 input pixels (the
// tile's windows plus a margin of kSortedMargin pixels of learned offset): summing them per region pixel
// first cuts the global atomics, which bound the plain kernel (L2 at 91 %), by the ratio of corners to region
// pixels (about 8x at 8 x 8). Shared-memory float atomics are compare-and-swap loops on sm_90, so the block
// instead sorts its corners by region pixel (a counting sort: one native integer shared atomic per corner, not
// per channel); then the threads of a region pixel (4 channels each) sum its corners' contributions in
// registers and add them with one 16-byte vector atomic each. Corners outside the region
// (offsets beyond the margin) are added directly, as in the plain kernel. The offset and weight
// gradients are computed as there, with one 16-byte vector a lane (2, 4 or 8 lanes a pixel). With kStaged
// the block first copies the region's input pixels (the group's channels) into shared memory and phase 1
// gathers its corners from there, as the staged forward does (measured on an H200, backward kernel:
// T det s1 fp16 331 -> 303 us, T224 s1 fp16 467 -> 442, 64x56x56x128 bf16 577 -> 555). On sm_90 the copy
// engine copies the region while the threads fill the grad_output tile (backward op on an H200, gradients of
// the offsets equal bit for bit: T224 s2 fp32 0.2500 -> 0.2431 ms, 64x28x28x256 bf16 0.3300 -> 0.3193; no
// row slower beyond noise).
constexpr int kSortedPixels = 64;  // a tile's output pixels at most (its threads: kSortedPixels x lanes)
constexpr int kSortedMargin = 3;  // learned offsets (before offset_scale) up to this many pixels
constexpr int kSortedMaxCells = 1024;
constexpr int kSortedEntries = kSortedPixels * 9 * 4;  // (pixel, point, corner)
// A recorded corner's key: its cell, then its tile pixel, then its rank among the cell's entries.
constexpr int kSortedSlotBits = 12;   // rank: < kSortedEntries
constexpr int kSortedPixelBits = 6;   // tile pixel: < kSortedPixels
constexpr int kSortedCellShift = kSortedSlotBits + kSortedPixelBits;
static_assert(kSortedEntries < (1 << kSortedSlotBits), "slot field too narrow");
static_assert(kSortedPixels <= (1 << kSortedPixelBits), "pixel field too narrow");
static_assert(kSortedMaxCells <= (1 << (31 - kSortedCellShift)), "cell field too narrow");
constexpr int kSortedRowShift = 20;  // cell / cols == cell * cols_magic >> 20 for cells < 1024, cols <= 1024

// The tile shape (tile_h x tile_w output pixels, at most kSortedPixels) and the tiles over the map
// (tiles_x a row), its region (tile_region) and 2^20 / cols + 1: a cell's row without a division.
struct SortedRegion {
  int tile_h, tile_w, tiles_x;
  int64_t tiles;
  int extent_h, extent_w, rows, cols;
  unsigned cols_magic;
};

// The tile shape that covers the output map with the fewest tiles, then the smallest region. A block's
// threads are those of kSortedPixels pixels however many of its tile lie in the map, and its per-block work
// (counts, scan, placement) scales with its region, so tiles cut by the map's edge waste both: on a 28 x 28
// map, 8 x 8 tiles give 16 blocks a map, 7 of them cut, for 784 pixels (1024 threads' worth), where 4 x 14
// tiles give 14 uncut ones (regions of 13 x 23 cells instead of 17 x 17: 9 % fewer cells a map). A/B on an
// H200, backward op: T224 s2 fp32 0.2351 -> 0.2143 ms, fp16 0.2232 -> 0.2159; 64x28x28x256 fp32 0.4183 ->
// 0.4052, fp16 0.3171 -> 0.2900; T det s4 (9 x 7 tiles) fp32 0.0535 -> 0.0499; 1x50x80x512 (4 x 16) fp16
// 0.0624 -> 0.0577; the largest loss 64x14x14x512 fp32 (7 x 7) 0.2116 -> 0.2205, fp16 0.1675 -> 0.1628.
// Candidates: for_each_tile_shape. Regions over kSortedMaxCells (large offset_scale, dilation or stride) come
// last.
inline SortedRegion sorted_region(const DCNv4Params& p) {
  SortedRegion best{};
  int64_t best_tiles = 0, best_cells = 0;
  const auto rank = [](int64_t cells) { return cells > kSortedMaxCells ? 1 : 0; };
  for_each_tile_shape(p, kSortedPixels, [&](int tile_h, int tile_w, int64_t tiles_x, int64_t tiles) {
    const TileRegion t = tile_region(p, tile_h, tile_w, kSortedMargin);
    const int64_t cells = int64_t{t.rows} * t.cols;
    if (best_tiles == 0 || rank(cells) < rank(best_cells) ||
        (rank(cells) == rank(best_cells) && (tiles < best_tiles || (tiles == best_tiles && cells < best_cells)))) {
      best = {tile_h, tile_w, static_cast<int>(tiles_x), tiles, t.extent_h, t.extent_w, t.rows, t.cols,
              (1u << kSortedRowShift) / static_cast<unsigned>(t.cols) + 1};
      best_tiles = tiles;
      best_cells = cells;
    }
  });
  return best;
}

// The pixels of a tile inside the map: `count` of them, from (y0, x0), `cols` a row.
struct TilePixels {
  int y0, x0, cols, count;
};

__device__ __forceinline__ TilePixels tile_pixels(const DCNv4Params& p, const SortedRegion& r, int tile_y,
                                                  int tile_x) {
  TilePixels tp;
  tp.y0 = tile_y * r.tile_h;
  tp.x0 = tile_x * r.tile_w;
  tp.cols = min(r.tile_w, static_cast<int>(p.out_width) - tp.x0);
  tp.count = min(r.tile_h, static_cast<int>(p.out_height) - tp.y0) * tp.cols;
  return tp;
}

// Phase 4 reads the grad_output rows of random tile pixels, a 16-byte vector a thread: at 32 channels the 8
// threads of a quarter warp read one row, 128 bytes, without bank conflicts; at 16 channels they read two
// rows of 64 bytes, which conflict when both lie in the same half of the banks. So at 16 channels fp32
// keeps each row twice, in both halves, and the two cells of a quarter warp read different copies
// (measured on an H200, backward kernel: T224 s2 fp32 244.5 -> 236.8 us, T224 s1 fp32 456.2 -> 443.8,
// T det s1 fp32 320.1 -> 313.9). fp16/bf16 (2 lanes) do not: their blocks are bound by shared memory,
// and the copy cost more than it saved (T224 s2 fp16 204.8 -> 216.5 us).
template <typename scalar_t, int LANES>
constexpr bool sorted_tile_copies() { return std::is_same_v<scalar_t, float> && LANES == 4; }  // fp32, 16 channels

// A row of the grad_output tile in shared memory: the group's channels, unpadded, once or twice.
template <typename scalar_t, int LANES>
constexpr int sorted_tile_row(int group_channels) {
  return group_channels * (sorted_tile_copies<scalar_t, LANES>() ? 2 : 1);
}

// With 2 lanes a pixel (fp16/bf16, 16 channels) the tile's offset and weight gradients are gathered in
// shared memory and written by consecutive threads, a pixel's 3 * K values at a time: written one by one
// from the pixels' first lanes, each value was a partial-sector store of its own. Measured on an H200,
// backward kernel: T224 s1 fp16 544 -> 508 us (-> 490 with phase 3 in place, which alone was slower at 2
// lanes: 573), T det s1 fp16 384 -> 356 (-> 347). With 4 or 8 lanes, added to phase 3 in place, it made
// rows slower (T224 s2 fp32 287 -> 306 us, 64x56x56x128 fp32 854 -> 911), so there the writers store
// directly, except where the tile's offsets are staged (kOffsets, 4 lanes): then they write over them in
// place, no extra shared memory (launch_backward_sorted).
template <int LANES>
constexpr bool sorted_gathers_offset_gradients() { return LANES == 2; }

// Shared memory a block may take without opting in to more.
constexpr size_t kSortedSharedLimit = 48 * 1024 - 256;  // less the kernel's static arrays (bucket, warp_offset,
                                                        // copy_barrier)

template <typename scalar_t, int LANES, bool kStaged>
size_t sorted_shared_bytes(const DCNv4Params& p, int cells) {
  const size_t offset_gradients = sorted_gathers_offset_gradients<LANES>() ? kSortedPixels * 3 * p.points : 0;
  const int tile_row = sorted_tile_row<scalar_t, LANES>(p.group_channels);
  return (kStaged ? size_t{16} * LANES * cells : 0)          // the staged region
         + sizeof(float) * kSortedPixels * tile_row           // the tile's grad_output, fp32
         + sizeof(scalar_t) * offset_gradients                // the tile's offset gradients
         + sizeof(int2) * kSortedEntries                      // key and weight, then sorted
         + sizeof(int) * (cells + 1)                          // per-cell counts, then starts
         + (kStaged ? 0 : sizeof(unsigned short) * cells);    // cells by count (else in the region)
}

// Where phase 1 records corner q of point k of tile pixel `local` (an entry: key and weight). At 2 lanes (16
// pixels a warp, lanes 0 and 1 recording corners q and q + 2 in two stores) a store writes two runs of 16
// pixels, 128 bytes each, in the corner-major layout: no bank conflicts. At 4 and 8 lanes (8 or 4 pixels a
// warp, lane q recording corner q) the 4 corners' runs of that layout were 512 bytes apart, in the same banks
// (4-way conflicts), so there a point's 4 corners of a pixel are adjacent and a warp's store covers 256 or 128
// contiguous bytes (A/B on an H200, backward op: T224 s1 fp32 0.4349 -> 0.4177 ms, T det s4 fp32 0.0609 ->
// 0.0589, 64x56x56x128 fp16 0.5462 -> 0.5338).
template <int LANES>
__device__ __forceinline__ int entry_slot(int k, int q, int local) {
  return LANES == 2 ? (k * 4 + q) * kSortedPixels + local : (k * kSortedPixels + local) * 4 + q;
}

// The tile pixel whose entries slot e (and e + kThreads j) hold.
template <int LANES>
__device__ __forceinline__ int entry_pixel(int e) {
  return (LANES == 2 ? e : e / 4) % kSortedPixels;
}

// Phase 4 takes the cells in order of decreasing entry count, so that the threads of a warp loop over
// about as many entries each: in cell order a warp ran a region row's cells, from its edge (few entries)
// to its middle (many), with 12 of 32 threads active on average in the loop (ncu at T224 s2 fp16 and
// T224 s1 fp32). A counting sort on min(count, kSortedBuckets - 1) orders them; empty cells come last.
constexpr int kSortedBuckets = 32;
__device__ __forceinline__ int count_bucket(int count) { return kSortedBuckets - 1 - min(count, kSortedBuckets - 1); }

// 64 registers at most (16 / LANES blocks of 64 * LANES threads fill the register file): 2 lanes with no
// bound took 71.
template <typename scalar_t, int V, int LANES, bool kStaged, bool kOffsets, bool kRemoveCenter, typename Accumulate>
__global__ void __launch_bounds__(kSortedPixels * LANES, 16 / LANES)
    dcnv4_backward_sorted_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                                 const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_offset_mask,
                                 const Accumulate accumulate, const DCNv4Params p, const SortedRegion r,
                                 const __grid_constant__ cuda_tma::RegionMap region_map,
                                 const bool copy_engine, const int first_image,
                                 const __grid_constant__ cuda_tma::RegionMap offsets_map, const int offsets_row) {
  static_assert(LANES == 2 || LANES == 4 || LANES == 8, "lane q records corner q of a point (q mod LANES)");
  constexpr int kThreads = kSortedPixels * LANES;
  constexpr int D = V * LANES;  // one vector a lane (try_backward_sorted)
  constexpr int kRow = sorted_tile_row<scalar_t, LANES>(D);
  constexpr bool kCopies = sorted_tile_copies<scalar_t, LANES>();
  constexpr int K = kRemoveCenter ? 8 : 9;
  const int cells = r.rows * r.cols, entries = kSortedPixels * K * 4;
  extern __shared__ __align__(128) unsigned char shared_bytes[];  // 128: the copy engine's alignment
  constexpr bool kGathered = sorted_gathers_offset_gradients<LANES>();
  // The tile's offset gradients are written by a warp per pixel after phase 1, from gom_tile (kGathered) or,
  // with kOffsets, from the staged offsets they replace (kept in place).
  constexpr bool kWriteTile = kGathered || kOffsets;
  constexpr int kCellBytes = 16 * LANES;  // a region pixel's channels of the group: a vector a lane
  // kOffsets: first the tile's offsets and weights of the group, [pixel][offsets_row] from the 16-byte
  // boundary below the group's first one (staged_offsets_row)
  const int offsets_bytes = kOffsets ? kSortedPixels * offsets_row * static_cast<int>(sizeof(scalar_t)) : 0;
  // The copy's bytes: the tile's tile_h x tile_w <= kSortedPixels rows.
  const int offsets_box_bytes = kOffsets ? r.tile_h * r.tile_w * offsets_row * static_cast<int>(sizeof(scalar_t)) : 0;
  scalar_t* staged_offsets = reinterpret_cast<scalar_t*>(shared_bytes);
  unsigned char* base = shared_bytes + offsets_bytes;
  uint4* region = reinterpret_cast<uint4*>(base);  // [cell][lane], if kStaged
  float* grad_tile = reinterpret_cast<float*>(base + (kStaged ? kCellBytes * cells : 0));  // [pixel][kRow]
  scalar_t* gom_tile = reinterpret_cast<scalar_t*>(grad_tile + kSortedPixels * kRow);  // [pixel][3 * K], if kGathered
  // Per entry (at entry_slot in phase 1), its key (kSortedCellShift, or -1) and the bits of
  // m * bilinear weight; from phase 3 on, the recorded entries sorted by cell: tile row (offset in floats)
  // and weight. One 8-byte record, so that phases 3 and 4 read an entry with one load.
  int2* entry = reinterpret_cast<int2*>(gom_tile + (kGathered ? kSortedPixels * 3 * K : 0));
  int* cell_start = reinterpret_cast<int*>(entry + kSortedEntries);  // counts, then exclusive starts
  // The cells in phase 4's order, in the staged region once phase 1 is done with it.
  unsigned short* order = reinterpret_cast<unsigned short*>(kStaged ? static_cast<void*>(region)
                                                                    : static_cast<void*>(cell_start + cells + 1));
  __shared__ int bucket[kSortedBuckets];  // cells per bucket, then its exclusive start, then its end
  __shared__ unsigned long long copy_barrier;  // the copy engine's, if kStaged

  const int lane = threadIdx.x % LANES, local = threadIdx.x / LANES;
  const int tile_y = blockIdx.x / r.tiles_x, tile_x = blockIdx.x - tile_y * r.tiles_x;
  const int g = blockIdx.y, n = blockIdx.z;
  // The tile's pixels inside the map are numbered row by row over the tile's columns inside the map, so
  // that in a ragged tile (cut by the map's edge; sorted_region keeps them few) the threads of the pixels
  // past the edge are the last ones and whole warps of them skip phase 1 (measured on an H200, backward
  // kernel: 64x28x28x256 fp16 339 -> 319 us, T224 s2 fp32 285 -> 271, L det s4 fp32 139 -> 130).
  const TilePixels tp = tile_pixels(p, r, tile_y, tile_x);
  // Threads past the map's edge stay to take part in the shuffles; they read and write nothing.
  const bool active = local < tp.count;
  const int yo = active ? tp.y0 + local / tp.cols : 0, xo = active ? tp.x0 + local % tp.cols : 0;
  const int C = static_cast<int>(p.channels);
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const int channel0 = g * D;
  const int out_pixel = yo * static_cast<int>(p.out_width) + xo;
  const int64_t out_image = static_cast<int64_t>(n) * p.out_height * p.out_width;
  const int64_t om_pixel = out_image * p.om_channels + out_pixel * static_cast<int>(p.om_channels);
  const int64_t om_offset = om_pixel + g * 3 * K;
  const int offsets_start = staged_offsets_start(g * 3 * K, sizeof(scalar_t));
  // Tile pixel (y, x)'s offsets and weights of group g in the staged offsets (kOffsets): read in phase 1, then
  // overwritten by their gradients.
  const auto staged_pixel = [&](int y, int x) {
    return staged_offsets + ((y - tp.y0) * r.tile_w + x - tp.x0) * offsets_row + g * 3 * K - offsets_start;
  };
  scalar_t* const staged_om = staged_pixel(yo, xo);
  const scalar_t* om = kOffsets ? staged_om : offset_mask + om_offset;
  const int64_t image_offset = static_cast<int64_t>(n) * H * W * C;
  const int64_t lane_channels = image_offset + channel0 + lane * V;  // this lane's vector of pixel (0, 0)
  const scalar_t* lane_image = value + lane_channels;
  const scalar_t* gout = grad_output + out_image * C + out_pixel * C + channel0;
  const auto centre = window_centre<float>(p, yo, xo);
  const RegionOrigin origin = region_origin(p, r, tp.y0, tp.x0);
  const int region_y = origin.y, region_x = origin.x;
  const float scale = static_cast<float>(p.offset_scale);
  // With the copy engine (sm_90), the region lands while the threads fill the grad_output tile below. The
  // dynamic shared memory follows the kernel's 256 bytes of static arrays, 128-byte aligned by its declaration;
  // kOffsets (chosen by the host only with the copy engine) relies on that.
  const bool engine = kOffsets || (kStaged && copy_engine && (__cvta_generic_to_shared(region) & 127) == 0);
  if constexpr (kStaged) {
    if (engine) {
      cuda_tma::arm_barrier(&copy_barrier, cells * kCellBytes + offsets_box_bytes);
      if (threadIdx.x == 0) {
        cuda_tma::copy_box(region, &region_map, &copy_barrier, channel0, region_x, region_y, first_image + n);
        if (kOffsets) {
          cuda_tma::copy_box(staged_offsets, &offsets_map, &copy_barrier, offsets_start, tp.x0, tp.y0, first_image + n);
        }
      }
    } else {
      stage_region<LANES>(region, value + image_offset + channel0, r.rows, r.cols, region_y, region_x, H, W, C);
    }
  }

  // The lane's grad_output vector: in registers for phase 1, in shared memory (the tile's) for phase 4.
  float gv[V];
  if (active) {
    to_acc(load_vec<scalar_t, V>(gout + lane * V), gv);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) gv[e] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < V; e += 4) {
    *reinterpret_cast<float4*>(grad_tile + local * kRow + lane * V + e) =
        make_float4(gv[e], gv[e + 1], gv[e + 2], gv[e + 3]);
    if constexpr (kCopies) {
      *reinterpret_cast<float4*>(grad_tile + local * kRow + D + lane * V + e) =
          make_float4(gv[e], gv[e + 1], gv[e + 2], gv[e + 3]);
    }
  }
  for (int i = threadIdx.x; i <= cells; i += kThreads) cell_start[i] = 0;
  if (threadIdx.x < kSortedBuckets) bucket[threadIdx.x] = 0;
  if constexpr (kStaged) {
    if (engine) {
      cuda_tma::wait_region(&copy_barrier);
    } else {
      wait_copies();
    }
  }
  __syncthreads();

  // Phase 1: the plain kernel's per-point work, with each in-region corner recorded instead of added. The
  // lanes of a pixel compute the geometry of different points (lane l: points l, l + LANES, ...) and pass
  // it to each other by shuffles, instead of every lane computing all nine.
  const int pixel_lane0 = (threadIdx.x % 32) & ~(LANES - 1);  // the pixel's first lane in the warp
  const char* lane_region = reinterpret_cast<const char*>(region + lane);  // this lane's vector of cell 0
  const int cell_row = r.cols * kCellBytes;
  constexpr int kRounds = (9 + LANES - 1) / LANES;
  const bool warp_active = __any_sync(0xffffffffu, active);  // else its entries are not read (phase 3)
  // At 2 lanes (5 rounds) the rounds stay a loop: unrolled, phase 1 was 3400 instructions, and a third of
  // its stall samples were instruction fetches (ncu at T224 s2 fp16); as a loop the backward kernel took
  // 234 instead of 267 us there (T224 s1 fp16 414 instead of 442). At 4 and 8 lanes (3 and 2 rounds) they
  // are unrolled: as a loop, fp32 was up to 1.4 % slower and fp16 with 32 channels mixed (64x56x56x128
  // 2.4 % slower, 64x14x14x768 4.5 % faster).
#pragma unroll(LANES == 2 ? 1 : kRounds)
  for (int round = 0; round < kRounds; ++round) {
    if (!warp_active) break;
    const int first = round * LANES;
    ShuffledPoint mine = {0, 0, 0, 0.f, 0.f, 0.f};
    if (active && first + lane < K) mine = shuffled_point<3, 3, kRemoveCenter>(p, om, centre, first + lane, H, W);
#pragma unroll
    for (int src = 0; src < LANES; ++src) {
      const int k = first + src;
      if (k >= K) break;
      const ShuffledPoint pt = shuffle_point(mine, src, LANES);
      const float lx = pt.lx, ly = pt.ly, hx = 1.f - lx, hy = 1.f - ly;
      const float weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};  // as bilinear_corners
      const float dx_coef[4] = {-hy, hy, -ly, ly};
      const float dy_coef[4] = {-hx, -lx, hx, lx};
      const int first_corner = (pt.y0 * W + pt.x0) * C;
      // No branch between the four corner loads, so they are in flight together: a corner outside the
      // image (or of an unused point) counts as zero whatever it reads (zeros of the staged region, or
      // pixel (0, 0) of the image). With the region staged, a point whose corners all lie in it reads them
      // from shared memory, others through L1.
      const int cy0 = pt.y0 - region_y, cx0 = pt.x0 - region_x;
      Vec<scalar_t, V> loaded[4];
      if (kStaged && static_cast<unsigned>(cy0) < static_cast<unsigned>(r.rows - 1) &&
          static_cast<unsigned>(cx0) < static_cast<unsigned>(r.cols - 1)) {
        const char* top = lane_region + (cy0 * r.cols + cx0) * kCellBytes;
        const char* corners[4] = {top, top + kCellBytes, top + cell_row, top + cell_row + kCellBytes};
#pragma unroll
        for (int q = 0; q < 4; ++q) loaded[q] = *reinterpret_cast<const Vec<scalar_t, V>*>(corners[q]);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool inside = pt.flags >> q & 1;
          loaded[q] = load_vec<scalar_t, V>(lane_image + (inside ? corner_offset(first_corner, q, C, W * C) : 0));
        }
      }
      float grad_m = 0, grad_x = 0, grad_y = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float f[V];
        to_acc(loaded[q], f);
        add_corner_terms(pt.flags >> q & 1 ? dot<V>(gv, f) : 0.f, weight[q], dx_coef[q], dy_coef[q], grad_m, grad_x,
                         grad_y);
      }
      // Lane q % LANES records corner q of the point: its key (cell, tile pixel, rank in the cell) and
      // weight. A corner inside the image but outside the region (an offset beyond the margin) is added
      // to global memory directly, by every lane for its channels.
      constexpr int kRecorders = LANES < 4 ? LANES : 4;
      unsigned spilled = 0;  // bit q: corner q goes straight to global memory
#pragma unroll
      for (int j = 0; j < 4 / kRecorders; ++j) {
        const int q = lane + j * LANES;  // >= 4: nothing to record (lanes 4-7 of 8)
        const int cy = cy0 + (q >> 1), cx = cx0 + (q & 1);
        const bool inside = q < 4 && (pt.flags >> q & 1);
        const bool in_region = static_cast<unsigned>(cy) < static_cast<unsigned>(r.rows) &&
                               static_cast<unsigned>(cx) < static_cast<unsigned>(r.cols);
        int key = -1;
        float weight_q = 0.f;
        if (inside && in_region) {
          const int cell = cy * r.cols + cx;
          key = cell << kSortedCellShift | local << kSortedSlotBits | atomicAdd(cell_start + cell, 1);
          weight_q = pt.m * ((q & 2 ? ly : hy) * (q & 1 ? lx : hx));  // weight[q]
        }
        if (q < 4) entry[entry_slot<LANES>(k, q, local)] = make_int2(key, __float_as_int(weight_q));
        const unsigned outside = __ballot_sync(0xffffffffu, inside && !in_region);
        spilled |= (outside >> pixel_lane0 & ((1u << kRecorders) - 1)) << (j * LANES);
      }
      if (spilled != 0) {
        grid_dependency::wait_for_prior_grids();  // the value gradient's zero fill (see phase 4)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (!(spilled >> q & 1)) continue;
          add_value_gradient<V>(accumulate, lane_channels + corner_offset(first_corner, q, C, W * C), pt.m * weight[q], gv);
        }
      }
      write_point_gradients(grad_m, grad_x, grad_y, LANES, active && lane == 0, pt.flags & kPointNan, pt.m, scale,
                            kGathered  ? gom_tile + local * 3 * K
                            : kOffsets ? staged_om
                                       : grad_offset_mask + om_offset,
                            k, K);
    }
  }
  if (active && lane == 0 && g == p.group - 1) zero_offset_padding(grad_offset_mask + om_pixel, p);
  __syncthreads();
  if constexpr (kWriteTile) {
    // The tile's offset gradients: a warp writes a pixel's 3 * K <= 27 values (consecutive in memory) at a
    // time, the warps kWarps pixels apart, each pixel's row and column advanced by additions. (A thread per
    // value, with two divisions each to find its pixel and place, was 19 % of the kernel's instructions;
    // ncu at T224 s2 fp16.) Offsets within an image fit in 32 bits (check_image_fits).
    constexpr int kWarps = kThreads / 32;
    const int per_pixel = 3 * K, warp_lane = threadIdx.x % 32;
    const int om_channels = static_cast<int>(p.om_channels), out_width = static_cast<int>(p.out_width);
    scalar_t* image_gom = grad_offset_mask + out_image * p.om_channels + g * per_pixel + warp_lane;
    const int step_rows = kWarps / tp.cols, step_cols = kWarps - step_rows * tp.cols, end_x = tp.x0 + tp.cols;
    int pixel = threadIdx.x / 32;
    int y = tp.y0 + pixel / tp.cols, x = tp.x0 + pixel % tp.cols;
    for (; pixel < tp.count; pixel += kWarps) {
      const scalar_t* src = kGathered ? gom_tile + pixel * per_pixel : staged_pixel(y, x);
      if (warp_lane < per_pixel) image_gom[(y * out_width + x) * om_channels] = src[warp_lane];
      y += step_rows;
      x += step_cols;
      if (x >= end_x) {
        x -= tp.cols;
        ++y;
      }
    }
  }

  // Phase 2: exclusive scan of the per-cell counts: a run of cells per thread, then warp and block offsets.
  {
    __shared__ int warp_offset[kThreads / 32];
    const int per = (cells + kThreads - 1) / kThreads;
    const int first = threadIdx.x * per, last = min(first + per, cells);
    const int warp = threadIdx.x / 32, warp_lane = threadIdx.x % 32;
    int sum = 0;
    for (int i = first; i < last; ++i) sum += cell_start[i];
    int inclusive = sum;
    for (int o = 1; o < 32; o *= 2) {
      const int t = __shfl_up_sync(0xffffffffu, inclusive, o);
      if (warp_lane >= o) inclusive += t;
    }
    if (warp_lane == 31) warp_offset[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const int total = warp_lane < kThreads / 32 ? warp_offset[warp_lane] : 0;
      int before = total;
      for (int o = 1; o < 32; o *= 2) {
        const int t = __shfl_up_sync(0xffffffffu, before, o);
        if (warp_lane >= o) before += t;
      }
      if (warp_lane < kThreads / 32) warp_offset[warp_lane] = before - total;
    }
    __syncthreads();
    int run = warp_offset[warp] + inclusive - sum;
    for (int i = first; i < last; ++i) {
      const int count = cell_start[i];
      cell_start[i] = run;
      run += count;
      atomicAdd(bucket + count_bucket(count), 1);
    }
    if (threadIdx.x == kThreads - 1) cell_start[cells] = run;
  }
  __syncthreads();

  // Phase 3: each recorded entry goes to its place in its cell's run, in the same arrays: every thread first
  // reads its entries into registers. (Sorting into separate arrays took 38.5 instead of 24.7 KB of shared
  // memory a block at 16 channels; measured on an H200, fp32 64x56x56x128 backward kernel 871 -> 854 us.)
  {
    constexpr int kPerThread = (kSortedEntries + kThreads - 1) / kThreads;
    static_assert(kThreads % ((LANES == 2 ? 1 : 4) * kSortedPixels) == 0, "a thread's entries are of one tile pixel");
    const bool recorded = entry_pixel<LANES>(threadIdx.x) < tp.count;  // else skipped in phase 1
    int2 record[kPerThread];  // key, weight bits
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int e = threadIdx.x + j * kThreads;
      record[j] = recorded && e < entries ? entry[e] : make_int2(-1, 0);
    }
    if (threadIdx.x < 32) {  // exclusive starts of the buckets
      const int count = bucket[threadIdx.x];
      int inclusive = count;
      for (int o = 1; o < 32; o *= 2) {
        const int t = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (threadIdx.x >= o) inclusive += t;
      }
      bucket[threadIdx.x] = inclusive - count;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int key = record[j].x;
      if (key >= 0) {
        const int place = cell_start[key >> kSortedCellShift] + (key & ((1 << kSortedSlotBits) - 1));
        entry[place] = make_int2((key >> kSortedSlotBits & ((1 << kSortedPixelBits) - 1)) * kRow, record[j].y);
      }
    }
    for (int cell = threadIdx.x; cell < cells; cell += kThreads) {
      order[atomicAdd(bucket + count_bucket(cell_start[cell + 1] - cell_start[cell]), 1)] = cell;
    }
  }
  __syncthreads();

  // Phase 4: per cell, threads of 4 channels each sum its entries' grad_output (from the tile in shared
  // memory) and add the sum to the value gradient once, with one 16-byte vector atomic. (Items of 8
  // channels, rows padded by 4 floats: the 8 threads of a quarter warp read 8 vectors of random rows, and
  // half of the kernel's shared wavefronts were bank conflicts, ncu at T224 s2 fp16. With items of 4,
  // measured on an H200, backward kernel: T224 s2 fp16 222.5 -> 206.4 us, fp32 266.6 -> 245.0; T224 s1
  // fp16 402.9 -> 361.4; 64x56x56x128 fp32 791.1 -> 744.9; value gradients within a relative 7.4e-8 in
  // fp32, 5.1e-6 in fp16, offset gradients bit-identical.)
  constexpr int kItem = 4;
  constexpr int kChunks = D / kItem;
  // With two copies (sorted_tile_copies), the 4 threads of a cell read the copy that the other cell of
  // their quarter warp does not.
  const int copy = kCopies ? (threadIdx.x / kChunks & 1) * D : 0;
  const int filled = bucket[kSortedBuckets - 2];  // cells with entries: the end of the last bucket but one
  // Launched as a dependent kernel (value_gradient), phases 1-3 may have run under the value gradient's zero
  // fill: wait for it before the first add.
  grid_dependency::wait_for_prior_grids();
  // sum(column, begin, end, index): entries [begin, end) of a cell, the item's channels of the tile's row 0 at
  // column, into the value gradient at index.
  const auto each_item = [&](const auto& sum) {
    for (int item = threadIdx.x; item < filled * kChunks; item += kThreads) {
      const int cell = order[item / kChunks], ch = (item % kChunks) * kItem;
      const int row = static_cast<int>(static_cast<unsigned>(cell) * r.cols_magic >> kSortedRowShift);
      const int h = region_y + row, w = region_x + cell - row * r.cols;
      sum(grad_tile + copy + ch, cell_start[cell], cell_start[cell + 1],
          image_offset + (static_cast<int64_t>(h) * W + w) * C + channel0 + ch);
    }
  };
  if constexpr (std::is_same_v<Accumulate, FixedPointAtomicAdd>) {
    // Deterministic mode: each entry's contribution is rounded to fixed point as the plain kernel rounds it,
    // and a cell's integers are summed exactly, so neither the order of its entries (their ranks come from
    // shared atomics) nor that of the global atomics changes the result: it equals the plain kernel's bit
    // for bit.
    const auto fixed_sums = [&](auto scale) {
      return [&, scale](const float* column, int begin, int end, int64_t index) {
        long long acc[kItem] = {0, 0, 0, 0};
        for (int i = begin; i < end; ++i) {
          const int2 sorted = entry[i];
          const float wgt = __int_as_float(sorted.y);
          const float4 gv = *reinterpret_cast<const float4*>(column + sorted.x);
          acc[0] += fixed_point::to_fixed(wgt * gv.x, scale);
          acc[1] += fixed_point::to_fixed(wgt * gv.y, scale);
          acc[2] += fixed_point::to_fixed(wgt * gv.z, scale);
          acc[3] += fixed_point::to_fixed(wgt * gv.w, scale);
        }
        accumulate.template add_fixed<kItem>(index, acc);
      };
    };
    const double scale = *accumulate.scale;  // computed before the fill (value_gradient)
    if (scale <= 0x1p126) {  // a float (false for NaN)
      each_item(fixed_sums(static_cast<float>(scale)));
    } else {
      each_item(fixed_sums(scale));
    }
  } else {
    each_item([&](const float* column, int begin, int end, int64_t index) {
      float acc[kItem] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
      for (int i = begin; i < end; ++i) {
        const int2 sorted = entry[i];
        const float wgt = __int_as_float(sorted.y);
        const float4 gv = *reinterpret_cast<const float4*>(column + sorted.x);
        acc[0] += wgt * gv.x;
        acc[1] += wgt * gv.y;
        acc[2] += wgt * gv.z;
        acc[3] += wgt * gv.w;
      }
      accumulate.template add<kItem>(index, acc);
    });
  }
}

// Must be called right after the zero fill of accumulate's buffer (cuda_buffers::zeros_under_next, as
// value_gradient does): the kernel is launched as a dependent one, and reads its inputs before it waits.
template <typename scalar_t, int V, int LANES, bool kStaged, typename Accumulate>
void launch_backward_sorted(const scalar_t* value, const scalar_t* offset_mask, const scalar_t* grad_output,
                            scalar_t* grad_offset_mask, Accumulate accumulate, const DCNv4Params& p,
                            const SortedRegion& r, cudaStream_t stream) {
  static_assert(V % 4 == 0, "the grad_output tile is read as float4");
  TORCH_CHECK(r.tiles < (int64_t{1} << 31) && p.group < 65536, "dcnv4: output map too large");
  const size_t shared = sorted_shared_bytes<scalar_t, LANES, kStaged>(p, r.rows * r.cols);
  TORCH_INTERNAL_ASSERT(shared <= kSortedSharedLimit, "dcnv4: sorted backward needs ", shared,
                        " bytes of shared memory");
  const int64_t out_image = p.out_height * p.out_width;
  // With kStaged on sm_90 the copy engine stages each region (one descriptor for the whole batch), as in the
  // staged forward; elsewhere, or if the driver refuses the descriptor, the block's threads copy it.
  cuda_tma::RegionMap region_map{}, offsets_map{};
  bool copy_engine = false;
  int offsets_row = 0;
  // remove_center fixed at compile time: the point count and each point's grid position are constants
  // (backward op on an H200, offset gradients equal bit for bit: 64x28x28x256 fp32 0.4052 -> 0.3952 ms,
  // 64x14x14x512 fp32 0.2205 -> 0.2145, T224 s2 fp32 0.2139 -> 0.2129; docs/dcnv4_op.md)
  auto pick = [&](auto offsets_staged) {
    constexpr bool kOffsets = decltype(offsets_staged)::value;
    return p.remove_center ? dcnv4_backward_sorted_kernel<scalar_t, V, LANES, kStaged, kOffsets, true, Accumulate>
                           : dcnv4_backward_sorted_kernel<scalar_t, V, LANES, kStaged, kOffsets, false, Accumulate>;
  };
  auto kernel = pick(std::false_type{});
  size_t total = shared;
  if constexpr (kStaged) {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    copy_engine = cuda_tma::encode_region_map(&region_map, device, value, sizeof(scalar_t), p.batch, p.height, p.width,
                                              p.channels, p.group_channels, r.cols, r.rows);
    // At 4 lanes (fp32 with 16 channels, fp16/bf16 with 32) the copy engine also stages the tile's offsets
    // and weights for phase 1, as in the staged forward (backward op on an H200, offset gradients equal bit
    // for bit: T224 s1 fp32 0.4521 -> 0.4315 ms, T224 s2 fp32 0.2423 -> 0.2341, T det s1 fp32 0.3211 ->
    // 0.3031, 1x200x320x128 fp16 0.1949 -> 0.1868). At 2 lanes, whose blocks are bound by shared memory, it
    // was level or up to 1.6 % slower (T224 s2 fp16 0.2218 -> 0.2252). Phase 1 then writes the offset and
    // weight gradients over the staged offsets, and a warp per pixel stores them (3 * K consecutive values):
    // written from the pixels' first lanes, each was a partial-sector store of its own, 27 a pixel (A/B on an
    // H200, backward op, offset gradients equal bit for bit: T224 s1 fp32 0.4146 -> 0.3963 ms, T det s1 fp32
    // 0.2930 -> 0.2719, T det s4 fp32 0.0581 -> 0.0535; fp16/bf16 with 32 channels level; with 8 x 8 tiles
    // T224 s2 fp32 was 1.7 % slower, 0.2316 -> 0.2355, with sorted_region's 4 x 14 level, 0.2153 -> 0.2144).
    const int row = staged_offsets_row(3 * p.points, sizeof(scalar_t));
    if (LANES == 4 && copy_engine &&
        encode_offsets_map(&offsets_map, device, offset_mask, sizeof(scalar_t), p, row, r.tile_h, r.tile_w)) {
      offsets_row = row;
      kernel = pick(std::true_type{});
      total = shared + kSortedPixels * row * sizeof(scalar_t);  // may pass 48 KB: opt in
      constexpr int kMostShared = kSortedSharedLimit + kSortedPixels * staged_offsets_row(27, sizeof(scalar_t)) *
                                                           static_cast<int>(sizeof(scalar_t));
      cuda_buffers::allow_dynamic_shared<
          dcnv4_backward_sorted_kernel<scalar_t, V, LANES, kStaged, true, false, Accumulate>, kMostShared>(device);
      cuda_buffers::allow_dynamic_shared<
          dcnv4_backward_sorted_kernel<scalar_t, V, LANES, kStaged, true, true, Accumulate>, kMostShared>(device);
    }
  }
  for_each_batch_slice(p.batch, [&](int64_t first, int64_t count) {
    Accumulate slice = accumulate;
    slice.base += first * p.height * p.width * p.channels;
    const dim3 grid(static_cast<unsigned>(r.tiles), static_cast<unsigned>(p.group), static_cast<unsigned>(count));
    // The first launch follows the zero fill, under which it may start (see above).
    cuda_buffers::launch_kernel(
        first == 0, kernel, grid, dim3(kSortedPixels * LANES), total, stream,
        value + first * p.height * p.width * p.channels, offset_mask + first * out_image * p.om_channels,
        grad_output + first * out_image * p.channels, grad_offset_mask + first * out_image * p.om_channels, slice, p,
        r, region_map, copy_engine, static_cast<int>(first), offsets_map, offsets_row);
  });
}

// Whether the sorted kernel runs: 16 or 32 channels a group (one 16-byte vector a lane: 2, 4 or 8 lanes), a
// 3x3 kernel and a region of at most kSortedMaxCells pixels; then it is faster than the plain kernel on
// every benchmark map (docs/dcnv4_op.md, H200: backward kernel 2-36 % faster on maps of 7 x 7 to
// 200 x 336), since it sums most corners in shared memory instead of by global atomics. It reads 16-byte
// vectors (the plain kernel reads 8 bytes of fp16/bf16, so that its fp32 atomics cover whole sectors).
template <typename scalar_t, typename Accumulate>
bool try_backward_sorted(const scalar_t* value, const scalar_t* offset_mask, const scalar_t* grad_output,
                         scalar_t* grad_offset_mask, Accumulate accumulate, const DCNv4Params& p,
                         cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(scalar_t);
  const int D = p.group_channels;
  const SortedRegion r = sorted_region(p);
  if (p.kernel_h != 3 || p.kernel_w != 3 || !(D == 16 || D == 32) || r.rows * r.cols > kSortedMaxCells ||
      !vector_fits<scalar_t, kV>(p.group_channels, {value, grad_output})) {
    return false;
  }
  TORCH_INTERNAL_ASSERT(D / kV == 2 || D / kV == 4 || D / kV == 8, "dcnv4: the sorted backward takes one vector a lane");
  const auto launch_lanes = [&](auto lanes) {
    constexpr int kLanes = decltype(lanes)::value;
    // Phase 1 gathers from the staged region when it fits in the block's 48 KB (2 or 4 lanes at stride 1;
    // at 8 lanes, fp32 with 32 channels, the region alone is 37 KB at stride 1, and staged with an opt-in
    // to more shared memory it was level: 64x56x56x128 backward kernel 812.4 -> 813.1 us on an H200).
    if constexpr (kLanes < 8) {
      if (sorted_shared_bytes<scalar_t, kLanes, true>(p, r.rows * r.cols) <= kSortedSharedLimit) {
        return launch_backward_sorted<scalar_t, kV, kLanes, true>(value, offset_mask, grad_output, grad_offset_mask,
                                                                  accumulate, p, r, stream);
      }
    }
    launch_backward_sorted<scalar_t, kV, kLanes, false>(value, offset_mask, grad_output, grad_offset_mask, accumulate,
                                                        p, r, stream);
  };
  if (D / kV == 2) {  // fp16/bf16, 16 channels
    launch_lanes(std::integral_constant<int, 2>{});
  } else if (D / kV == 4) {  // fp16/bf16 with 32 channels, fp32 with 16
    launch_lanes(std::integral_constant<int, 4>{});
  } else {  // fp32 with 32 channels
    launch_lanes(std::integral_constant<int, 8>{});
  }
  return true;
}

template <typename scalar_t, int V, int KH, int KW, typename Accumulate>
void launch_backward(const scalar_t* value, const scalar_t* offset_mask, const scalar_t* grad_output,
                     scalar_t* grad_offset_mask, Accumulate accumulate, const DCNv4Params& p, cudaStream_t stream) {
  const int vecs = p.group_channels / V;
  // Lanes of a pixel stay inside one warp (for the shuffles) and loop over the group's chunks.
  const int lanes = lanes_for(vecs);
  const TileShape t = make_tile_shape(p, lanes, 1, group_span_for(p, lanes, 1));
  const int64_t out_image = p.out_height * p.out_width;
  for_each_batch_slice(p.batch, [&](int64_t first, int64_t count) {
    // The accumulator indexes the whole value gradient: offset its base like the inputs.
    Accumulate slice = accumulate;
    slice.base += first * p.height * p.width * p.channels;
    const dim3 grid = tile_grid(t, p, count);
    dcnv4_backward_kernel<scalar_t, V, KH, KW, Accumulate><<<grid, t.threads, 0, stream>>>(
        value + first * p.height * p.width * p.channels, offset_mask + first * out_image * p.om_channels,
        grad_output + first * out_image * p.channels, grad_offset_mask + first * out_image * p.om_channels,
        slice, p, t, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Instantiates only what is used (see dispatch_forward).
template <typename scalar_t, typename Accumulate>
void dispatch_backward(const at::Tensor& value, const at::Tensor& offset_mask, const at::Tensor& grad_output,
                       at::Tensor& grad_offset_mask, Accumulate accumulate, const DCNv4Params& p,
                       cudaStream_t stream) {
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* om = offset_mask.const_data_ptr<scalar_t>();
  scalar_t* gom = grad_offset_mask.mutable_data_ptr<scalar_t>();
  // fp32 accumulation of the value gradient: each thread adds 4 channels (one 16-byte vector atomic), so
  // the 8 threads of a 32-byte-aligned run of channels cover whole L2 sectors. fp16/bf16 therefore load
  // 8-byte vectors here: with 16-byte loads a thread's two float4 atomics would each touch half of two
  // sectors, doubling the sector atomics that bound this kernel (measured on an H200: forward+backward
  // 1.4-1.7x slower at 32 channels a group). The sorted kernel, which has few atomics left, reads 16 bytes.
  constexpr bool kHalf = !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
  constexpr int kWide = kHalf ? 4 : 16 / sizeof(scalar_t);
  const bool wide = vector_fits<scalar_t, kWide>(p.group_channels, {v, go});
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (wide && p.kernel_h == 3 && p.kernel_w == 3) {
      if (try_backward_sorted<scalar_t>(v, om, go, gom, accumulate, p, stream)) return;
      return launch_backward<scalar_t, kWide, 3, 3>(v, om, go, gom, accumulate, p, stream);
    }
  }
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (wide) return launch_backward<scalar_t, kWide, 0, 0>(v, om, go, gom, accumulate, p, stream);
  }
  launch_backward<scalar_t, 1, 0, 0>(v, om, go, gom, accumulate, p, stream);
}

// Power-of-two fixed-point scale on the device (see the file comment): a one-element double tensor; 0 if the
// bound is not finite, so non-finite gradients turn the value gradient into NaN rather than into wrapped
// integers.
template <typename scalar_t>
at::Tensor fixed_point_scale(const at::Tensor& offset_mask, const at::Tensor& grad_output, const DCNv4Params& p,
                             cudaStream_t stream) {
  const int K = static_cast<int>(p.points);
  at::Tensor absmax = cuda_buffers::zeros({2}, grad_output.options().dtype(at::kFloat), stream);
  at::Tensor scale = at::empty({1}, grad_output.options().dtype(at::kDouble));
  float* max_grad = absmax.mutable_data_ptr<float>();
  fixed_point::launch_abs_max(grad_output.const_data_ptr<scalar_t>(), fixed_point::contiguous(grad_output.numel()),
                              max_grad, stream);
  // The weights m: per output pixel (a row of om_channels), per group the last K of its 3 * K values.
  const fixed_point::Layout weights{p.batch * p.out_height * p.out_width, p.om_channels, static_cast<int>(p.group), K,
                                    3 * K, 2 * K};
  fixed_point::launch_abs_max(offset_mask.const_data_ptr<scalar_t>(), weights, max_grad + 1, stream);
  fixed_point::launch_scale(absmax.const_data_ptr<float>(), 2, static_cast<double>(p.out_height * p.out_width * K),
                            scale.mutable_data_ptr<double>(), stream);
  return scale;
}

// Runs the kernel with the accumulator the mode and dtype call for, and returns the value gradient.
template <typename scalar_t>
at::Tensor value_gradient(const at::Tensor& value, const at::Tensor& offset_mask, const at::Tensor& grad_output,
                          at::Tensor& grad_offset_mask, const DCNv4Params& p, bool deterministic,
                          cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (deterministic) {
    // The scale first: the zero fill must be the launch right before the kernel that may start under it.
    const at::Tensor scale = fixed_point_scale<scalar_t>(offset_mask, grad_output, p, stream);
    at::Tensor fixed = cuda_buffers::zeros_under_next(value.sizes(), value.options().dtype(at::kLong), stream);
    FixedPointAtomicAdd add{reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>()),
                            scale.const_data_ptr<double>()};
    dispatch_backward<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, add, p, stream);
    at::Tensor grad_value = at::empty_like(value);
    fixed_point::to_value<scalar_t>(fixed, scale, grad_value, stream, /*dependent=*/true);
    return grad_value;
  }
  // Buffers from common/cuda_buffers.cuh (no TensorIterator: small maps are bound by host time). The zero
  // fill is a kernel under which the sorted kernel, launched as a dependent one on sm_90, may start its
  // phases 1-3; the fp16/bf16 rounding is a dependent launch too. Measured on an H200, forward+backward:
  // T224 s2 fp32 0.2610 -> 0.2572 ms, fp16 0.2548 -> 0.2502, 64x28x28x256 fp16 0.3564 -> 0.3521
  // (docs/dcnv4_op.md).
  // fp32/fp64 add into the gradient itself, fp16/bf16 into an fp32 buffer rounded once.
  at::Tensor accum = cuda_buffers::zeros_under_next(
      value.sizes(), value.options().dtype(c10::CppTypeToScalarType<acc_t>::value), stream);
  FloatAtomicAdd<acc_t> add{accum.mutable_data_ptr<acc_t>()};
  dispatch_backward<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, add, p, stream);
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return accum;
  } else {
    at::Tensor grad_value = at::empty_like(value);
    cuda_buffers::round_into<scalar_t>(accum, grad_value, stream, /*dependent=*/true);
    return grad_value;
  }
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cuda(
    const at::Tensor& value_in, const at::Tensor& offset_mask_in, const at::Tensor& grad_output_in,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, double offset_scale, bool remove_center,
    bool deterministic) {
  const auto p = make_dcnv4_params(value_in, offset_mask_in, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                   pad_w, dilation_h, dilation_w, group, offset_scale, remove_center);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({p.batch, p.out_height, p.out_width, p.channels}),
              "dcnv4_backward: grad_output must have the output's shape");
  TORCH_CHECK(grad_output_in.device() == value_in.device(), "dcnv4_backward: grad_output is on another device");
  check_image_fits(p);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous().to(value.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (grad_output.numel() == 0 || value.numel() == 0) return {at::zeros_like(value), at::zeros_like(offset_mask)};
  // Every element is written by the kernels, the padded tail of each pixel with zeros (zero_offset_padding).
  at::Tensor grad_offset_mask = at::empty_like(offset_mask);

  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_backward_cuda", [&] {
    grad_value = value_gradient<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, p, deterministic, stream);
  });
  return {grad_value, grad_offset_mask};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) { m.impl("dcnv4_backward", &cuda::dcnv4_backward_cuda); }

}  // namespace mmdcnv4
