// Multi-scale deformable attention on CUDA: the forward kernels (mmcv and flash layouts).
//
// One slot of LANES threads per (image, query, head, channel block) row (see ms_deform_attn_cuda.cuh);
// accumulation in fp32 (fp64 for fp64), one rounding at the end. The flash layout's softmax is computed by
// the slot from the row's logits before the sampling, never materialised. No host synchronisation: the
// level tables are read by the kernel on the device.
#include "ms_deform_attn/cuda/ms_deform_attn_cuda.cuh"

namespace mmdcnv4 {
namespace msda_cuda {
namespace {

template <typename acc_t>
struct alignas(16) ForwardEntry {
  int index[4];  // flat positions in the image (start + y * W + x), -1 for a corner not sampled
  acc_t weight[4];  // probability * bilinear weight
};

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* value;           // (N, Len_in, heads, D)
  const int64_t* spatial_shapes;   // (L, 2)
  const int64_t* level_start;      // (L,)
  const scalar_t* sampling;        // flash: (N, Len_q, heads, 3LP); mmcv: (N, Len_q, heads, L, P, 2)
  const scalar_t* weights;         // mmcv: (N, Len_q, heads, L, P); flash: unused
  scalar_t* output;                // (N, Len_q, heads * D)
  int64_t batch;
  int len_in, len_q, heads, channels, levels, points;
  int channel_blocks;              // channel blocks of LANES * VEC channels per row
  int rows;                        // rows of one image: len_q * heads * channel_blocks
};

template <typename scalar_t, int VEC, int LANES, bool FLASH>
__global__ void __launch_bounds__(Launch<LANES>::threads, Launch<LANES>::min_blocks)
    msda_forward_kernel(const ForwardArgs<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int kSlots = Launch<LANES>::slots;
  __shared__ ForwardEntry<acc_t> table[kSlots][kChunk];

  const int slot = threadIdx.x / LANES;
  const int lane = threadIdx.x % LANES;
  const int task = blockIdx.x * kSlots + slot;
  if (task >= a.rows) return;  // the whole slot leaves together
  const unsigned mask = slot_mask<LANES>();
  const int block = task % a.channel_blocks;
  const int qh = task / a.channel_blocks;
  const int h = qh / a.len_q;  // head-major, see ms_deform_attn_cuda.cuh
  const int q = qh - h * a.len_q;
  const int c = (block * LANES + lane) * VEC;
  const bool active = c < a.channels;
  const int lp = a.levels * a.points;
  const int64_t row_stride = static_cast<int64_t>(a.heads) * a.channels;
  ForwardEntry<acc_t>* my_table = table[slot];

  for (int64_t n = blockIdx.y; n < a.batch; n += gridDim.y) {
    const int64_t row = (n * a.len_q + q) * a.heads + h;
    const scalar_t* __restrict__ image = a.value + n * a.len_in * row_stride + static_cast<int64_t>(h) * a.channels + c;
    const scalar_t* __restrict__ loc = a.sampling + row * (FLASH ? 3 : 2) * lp;
    const scalar_t* __restrict__ weights = FLASH ? loc + 2 * lp : a.weights + row * lp;
    acc_t m = acc_t(0), inv_sum = acc_t(0);
    if constexpr (FLASH) softmax_stats<LANES>(weights, lp, lane, mask, m, inv_sum);

    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);

    for (int first = 0; first < lp; first += kChunk) {
      const int count = min(kChunk, lp - first);
      // 1. The slot's lanes fill the table for points first .. first + count - 1.
      for (int e = lane; e < count; e += LANES) {
        const int j = first + e;
        const LevelInfo lv = load_level(a.spatial_shapes, a.level_start, j / a.points, a.len_in);
        ForwardEntry<acc_t> entry;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          entry.index[k] = -1;
          entry.weight[k] = acc_t(0);
        }
        if (lv.ok) {
          const acc_t p = point_probability<FLASH>(weights, j, m, inv_sum);
          const acc_t x = static_cast<acc_t>(loc[2 * j]) * lv.width - acc_t(0.5);
          const acc_t y = static_cast<acc_t>(loc[2 * j + 1]) * lv.height - acc_t(0.5);
          const auto cr = msda_corners<acc_t>(x, y, lv.height, lv.width, lv.start);
          if (cr.nan) {  // a NaN location makes the output NaN, as in the reference
            entry.index[0] = lv.start;
            entry.weight[0] = quiet_nan<acc_t>();
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              entry.index[k] = cr.index[k];
              entry.weight[k] = p * cr.weight[k];
            }
          }
        }
        my_table[e] = entry;
      }
      __syncwarp(mask);
      // 2. Every lane gathers its VEC channels at the four corners of each point. Four points unrolled
      // keep up to 16 independent loads in flight (DINO decoder fp32 forward on an H200: 0.0318 ms with
      // two and no register bound, 0.0286 with two and at most 40 registers, 0.0237 with four and 64).
      if (active) {
#pragma unroll 4
        for (int e = 0; e < count; ++e) {
          const ForwardEntry<acc_t> entry = my_table[e];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (entry.index[k] >= 0) {
              acc_t v[VEC];
              VecIO<scalar_t, VEC>::load(image + static_cast<int64_t>(entry.index[k]) * row_stride, v);
#pragma unroll
              for (int i = 0; i < VEC; ++i) acc[i] += entry.weight[k] * v[i];
            }
          }
        }
      }
      __syncwarp(mask);
    }
    if (active) VecIO<scalar_t, VEC>::store(a.output + row * a.channels + c, acc);
  }
}

template <typename scalar_t, int VEC, int LANES, bool FLASH>
void launch_forward(const ForwardArgs<scalar_t>& args, cudaStream_t stream) {
  const dim3 grid = grid_for(args.rows, Launch<LANES>::slots, args.batch);
  msda_forward_kernel<scalar_t, VEC, LANES, FLASH><<<grid, Launch<LANES>::threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool FLASH, int V>
void dispatch_forward(ForwardArgs<scalar_t> args, bool vector_ok, cudaStream_t stream) {
  if constexpr (V > 1) {
    if (vector_ok) {
      const int lanes = lanes_for(args.channels, V);
      args.channel_blocks = (args.channels + lanes * V - 1) / (lanes * V);
      args.rows = args.len_q * args.heads * args.channel_blocks;
      switch (lanes) {
        case 4: return launch_forward<scalar_t, V, 4, FLASH>(args, stream);
        case 8: return launch_forward<scalar_t, V, 8, FLASH>(args, stream);
        case 16: return launch_forward<scalar_t, V, 16, FLASH>(args, stream);
        default: return launch_forward<scalar_t, V, 32, FLASH>(args, stream);
      }
    }
  }
  args.channel_blocks = (args.channels + 31) / 32;
  args.rows = args.len_q * args.heads * args.channel_blocks;
  launch_forward<scalar_t, 1, 32, FLASH>(args, stream);
}

at::Tensor forward_cuda(const char* op, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                        const at::Tensor& level_start_index_in, const at::Tensor& sampling_in,
                        const at::Tensor& weights_in, int64_t num_points, bool flash) {
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto p = make_msda_params(op, value_in, spatial_shapes_in, level_start_index_in, sampling_in, weights_in,
                                  num_points, flash);
  TORCH_CHECK(value_in.is_cuda(), op, ": expected CUDA tensors");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling = sampling_in.contiguous();
  const at::Tensor weights = flash ? at::Tensor() : weights_in.contiguous();
  at::Tensor output = at::empty({p.batch, p.len_q, p.heads * p.channels}, value.options());
  if (output.numel() == 0) return output;
  if (value.numel() == 0) return output.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    ForwardArgs<scalar_t> args;
    args.value = value.const_data_ptr<scalar_t>();
    args.spatial_shapes = spatial_shapes.const_data_ptr<int64_t>();
    args.level_start = level_start_index.const_data_ptr<int64_t>();
    args.sampling = sampling.const_data_ptr<scalar_t>();
    args.weights = flash ? nullptr : weights.const_data_ptr<scalar_t>();
    args.output = output.mutable_data_ptr<scalar_t>();
    args.batch = p.batch;
    args.len_in = static_cast<int>(p.len_in);
    args.len_q = static_cast<int>(p.len_q);
    args.heads = static_cast<int>(p.heads);
    args.channels = static_cast<int>(p.channels);
    args.levels = static_cast<int>(p.levels);
    args.points = static_cast<int>(p.points);
    constexpr int V = vector_width<scalar_t>();
    const bool vector_ok = p.channels % V == 0 && aligned16(args.value) && aligned16(args.output);
    // fp16/bf16 with 16-byte loads: 4 lanes per row of 32 channels. When that gives less than one wave
    // of threads (DINO's decoder: 900 queries), 8-byte loads and twice the lanes hide more latency
    // (measured on an H200: 0.035 -> 0.020 ms there; 2-25 % slower on the larger cases).
    constexpr int V4 = narrow_vector_width<scalar_t>();
    const int64_t wide_threads = p.batch * p.len_q * p.heads * lanes_for(p.channels, V);
    const bool narrow = V4 != V && wide_threads < resident_threads(value.get_device());
    const auto run = [&](auto width) {
      constexpr int W = decltype(width)::value;
      flash ? dispatch_forward<scalar_t, true, W>(args, vector_ok, stream)
            : dispatch_forward<scalar_t, false, W>(args, vector_ok, stream);
    };
    narrow ? run(std::integral_constant<int, V4>{}) : run(std::integral_constant<int, V>{});
  });
  return output;
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  return forward_cuda("ms_deform_attn_forward", value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, 0, false);
}

at::Tensor flash_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                          const at::Tensor& level_start_index, const at::Tensor& sampling_loc_attn,
                                          int64_t num_points) {
  return forward_cuda("flash_deform_attn_forward", value, spatial_shapes, level_start_index, sampling_loc_attn,
                      at::Tensor(), num_points, true);
}

}  // namespace
}  // namespace msda_cuda

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) {
  m.impl("ms_deform_attn_forward", &msda_cuda::ms_deform_attn_forward_cuda);
  m.impl("flash_deform_attn_forward", &msda_cuda::flash_deform_attn_forward_cuda);
}

}  // namespace mmdcnv4
