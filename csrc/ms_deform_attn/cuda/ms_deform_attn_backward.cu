// Multi-scale deformable attention on CUDA: the backward kernels (mmcv and flash layouts).
//
// One slot of LANES threads per (image, query, head) row (see ms_deform_attn_cuda.cuh). Per point, every
// lane forms the dot products s_q = sum_c g_c v_c(corner q) over its channels; one butterfly over the
// slot gives the point's weight gradient a = sum_q w_q s_q and its two location gradients, which the
// lane owning the point (j % LANES) writes: no atomics and no shared-memory reduction for the sampling
// gradients, so they are deterministic. The flash layout's logit gradient p_i (a_i - sum_j p_j a_j)
// needs every a_j of the row; they are kept in shared memory (global scratch for more than kStashPoints
// points) by their owner lane, which also reads them back, so no extra synchronisation is needed.
//
// The value gradient is a scatter. Default: fp32 atomics (16-byte vector atomics on sm_90) into the
// gradient itself (fp32), into an fp32 buffer rounded once at the end (fp16/bf16), or fp64 atomics (fp64).
// Deterministic mode (torch.are_deterministic_algorithms_enabled()): int64 fixed-point atomics, whose
// sum does not depend on their order, with a power-of-two scale derived on the device from
// max|grad_output| * max|attention weight| (no host synchronisation, so CUDA-graph capture works); then
// one pass converts to the value's dtype.
#include "common/fixed_point.cuh"
#include "ms_deform_attn/cuda/ms_deform_attn_cuda.cuh"

namespace mmdcnv4 {
namespace msda_cuda {
namespace {

template <typename acc_t>
struct alignas(16) BackwardEntry {
  int index[4];   // flat positions in the image, -1 for a corner not sampled; index[0] == -2: NaN location
  acc_t wp[4];    // probability * bilinear weight (0 for a missing corner)
  acc_t lx, ly;   // fractional parts of the pixel coordinates (0 for an unused point)
  acc_t p;        // probability of the point
  acc_t unused;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start;
  const scalar_t* sampling;      // flash: (N, Len_q, heads, 3LP); mmcv: (N, Len_q, heads, L, P, 2)
  const scalar_t* weights;       // mmcv: (N, Len_q, heads, L, P)
  const scalar_t* grad_output;   // (N, Len_q, heads * D)
  acc_t* grad_value;             // accumulation buffer (default mode), zero-filled
  long long* grad_value_fixed;   // fixed-point buffer (deterministic mode), zero-filled; else nullptr
  const double* fixed_scale;     // deterministic mode: units per 1 of the fixed point, 0 if not finite
  scalar_t* grad_sampling;       // like sampling: location gradients (and logit gradients, flash)
  scalar_t* grad_weights;        // mmcv: like weights
  acc_t* stash;                  // flash with L*P > kStashPoints: (rows, L*P) scratch; else nullptr
  int64_t batch;
  int len_in, len_q, heads, channels, levels, points;
  int channel_blocks;            // > 1 only in the MULTI_BLOCK kernels: blocks of LANES * VEC channels
  int rows;                      // rows of one image: len_q * heads
};

template <typename scalar_t, int VEC, int LANES, bool FLASH, bool MULTI_BLOCK>
__global__ void __launch_bounds__(Launch<LANES>::threads, Launch<LANES>::min_blocks)
    msda_backward_kernel(const BackwardArgs<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int kSlots = Launch<LANES>::slots;
  __shared__ BackwardEntry<acc_t> table[kSlots][kChunk];
  __shared__ acc_t stash_smem[FLASH ? kSlots : 1][FLASH ? kStashPoints : 1];

  const int slot = threadIdx.x / LANES;
  const int lane = threadIdx.x % LANES;
  const int task = blockIdx.x * kSlots + slot;
  if (task >= a.rows) return;  // the whole slot leaves together
  const unsigned mask = slot_mask<LANES>();
  const int h = task / a.len_q;  // head-major, see ms_deform_attn_cuda.cuh
  const int q = task - h * a.len_q;
  const int lp = a.levels * a.points;
  const int64_t row_stride = static_cast<int64_t>(a.heads) * a.channels;
  BackwardEntry<acc_t>* my_table = table[slot];
  const bool fixed = a.grad_value_fixed != nullptr;
  const double scale = fixed ? *a.fixed_scale : 0.0;

  for (int64_t n = blockIdx.y; n < a.batch; n += gridDim.y) {
    const int64_t row = (n * a.len_q + q) * a.heads + h;
    const int64_t head_offset = n * a.len_in * row_stride + static_cast<int64_t>(h) * a.channels;
    const scalar_t* __restrict__ image = a.value + head_offset;
    const scalar_t* __restrict__ grad_out = a.grad_output + row * a.channels;
    const scalar_t* __restrict__ loc = a.sampling + row * (FLASH ? 3 : 2) * lp;
    const scalar_t* __restrict__ weights = FLASH ? loc + 2 * lp : a.weights + row * lp;
    scalar_t* grad_loc = a.grad_sampling + row * (FLASH ? 3 : 2) * lp;
    scalar_t* grad_w = FLASH ? grad_loc + 2 * lp : a.grad_weights + row * lp;
    acc_t* stash = nullptr;
    if constexpr (FLASH) stash = lp <= kStashPoints ? stash_smem[slot] : a.stash + row * lp;

    acc_t m = acc_t(0), inv_sum = acc_t(0);
    if constexpr (FLASH) softmax_stats<LANES>(weights, lp, lane, mask, m, inv_sum);

    // The output gradient of this lane's channels (single channel block: loaded once).
    acc_t g[VEC];
    const int c_single = lane * VEC;
    if constexpr (!MULTI_BLOCK) {
      if (c_single < a.channels) {
        VecIO<scalar_t, VEC>::load(grad_out + c_single, g);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[i] = acc_t(0);
      }
    }
    acc_t dot = acc_t(0);  // sum over this lane's points of p_j * a_j (flash)

    for (int first = 0; first < lp; first += kChunk) {
      const int count = min(kChunk, lp - first);
      for (int e = lane; e < count; e += LANES) {
        const int j = first + e;
        const LevelInfo lv = load_level(a.spatial_shapes, a.level_start, j / a.points, a.len_in);
        BackwardEntry<acc_t> entry;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          entry.index[k] = -1;
          entry.wp[k] = acc_t(0);
        }
        entry.lx = entry.ly = entry.unused = acc_t(0);
        entry.p = point_probability<FLASH>(weights, j, m, inv_sum);
        if (lv.ok) {
          const acc_t x = static_cast<acc_t>(loc[2 * j]) * lv.width - acc_t(0.5);
          const acc_t y = static_cast<acc_t>(loc[2 * j + 1]) * lv.height - acc_t(0.5);
          const auto cr = msda_corners<acc_t>(x, y, lv.height, lv.width, lv.start);
          if (cr.nan) {
            entry.index[0] = -2;
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              entry.index[k] = cr.index[k];
              entry.wp[k] = entry.p * cr.weight[k];
            }
            entry.lx = cr.lx;
            entry.ly = cr.ly;
          }
        }
        my_table[e] = entry;
      }
      __syncwarp(mask);

#pragma unroll 2
      for (int e = 0; e < count; ++e) {
        const BackwardEntry<acc_t> entry = my_table[e];
        acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        for (int block = 0; block < (MULTI_BLOCK ? a.channel_blocks : 1); ++block) {
          const int c = MULTI_BLOCK ? (block * LANES + lane) * VEC : c_single;
          if (c >= a.channels) break;
          if constexpr (MULTI_BLOCK) VecIO<scalar_t, VEC>::load(grad_out + c, g);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (entry.index[k] < 0) continue;
            const int64_t offset = static_cast<int64_t>(entry.index[k]) * row_stride + c;
            acc_t v[VEC];
            VecIO<scalar_t, VEC>::load(image + offset, v);
            acc_t contribution[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              s[k] += g[i] * v[i];
              contribution[i] = entry.wp[k] * g[i];
            }
            if (fixed) {
              if (scale > 0.0) fixed_add_channels<VEC>(a.grad_value_fixed + head_offset + offset, contribution, scale);
            } else {
              atomic_add_channels<VEC>(a.grad_value + head_offset + offset, contribution);
            }
          }
        }
        // Bilinear weights without the masks: a missing corner has s = 0.
        const acc_t hx = acc_t(1) - entry.lx, hy = acc_t(1) - entry.ly;
        acc_t grad_a = hy * hx * s[0] + hy * entry.lx * s[1] + entry.ly * hx * s[2] + entry.ly * entry.lx * s[3];
        acc_t grad_x = hy * (s[1] - s[0]) + entry.ly * (s[3] - s[2]);
        acc_t grad_y = hx * (s[2] - s[0]) + entry.lx * (s[3] - s[1]);
        grad_a = slot_sum<LANES>(grad_a, mask);
        grad_x = slot_sum<LANES>(grad_x, mask);
        grad_y = slot_sum<LANES>(grad_y, mask);
        const int j = first + e;
        if (j % LANES == lane) {  // the owner of point j writes its gradients
          if (entry.index[0] == -2) grad_a = quiet_nan<acc_t>();
          const LevelInfo lv = load_level(a.spatial_shapes, a.level_start, j / a.points, a.len_in);
          grad_loc[2 * j] = static_cast<scalar_t>(entry.p * acc_t(lv.width) * grad_x);
          grad_loc[2 * j + 1] = static_cast<scalar_t>(entry.p * acc_t(lv.height) * grad_y);
          if constexpr (FLASH) {
            stash[j] = grad_a;
            dot += entry.p * grad_a;
          } else {
            grad_w[j] = static_cast<scalar_t>(grad_a);
          }
        }
      }
      __syncwarp(mask);
    }

    if constexpr (FLASH) {  // d logit_j = p_j (a_j - sum_i p_i a_i)
      dot = slot_sum<LANES>(dot, mask);
      for (int j = lane; j < lp; j += LANES) {
        const acc_t p = point_probability<FLASH>(weights, j, m, inv_sum);
        grad_w[j] = static_cast<scalar_t>(p * (stash[j] - dot));
      }
    }
  }
}

template <typename scalar_t, int VEC, int LANES, bool FLASH, bool MULTI_BLOCK>
void launch_backward(const BackwardArgs<scalar_t>& args, cudaStream_t stream) {
  const dim3 grid = grid_for(args.rows, Launch<LANES>::slots, args.batch);
  msda_backward_kernel<scalar_t, VEC, LANES, FLASH, MULTI_BLOCK>
      <<<grid, Launch<LANES>::threads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool FLASH, int V>
void dispatch_backward(BackwardArgs<scalar_t> args, bool vector_ok, cudaStream_t stream) {
  if constexpr (V > 1) {
    if (vector_ok) {
      const int lanes = lanes_for(args.channels, V);
      args.channel_blocks = (args.channels + lanes * V - 1) / (lanes * V);
      if (args.channel_blocks > 1) return launch_backward<scalar_t, V, 32, FLASH, true>(args, stream);
      switch (lanes) {
        case 4: return launch_backward<scalar_t, V, 4, FLASH, false>(args, stream);
        case 8: return launch_backward<scalar_t, V, 8, FLASH, false>(args, stream);
        case 16: return launch_backward<scalar_t, V, 16, FLASH, false>(args, stream);
        default: return launch_backward<scalar_t, V, 32, FLASH, false>(args, stream);
      }
    }
  }
  args.channel_blocks = (args.channels + 31) / 32;
  if (args.channel_blocks > 1) return launch_backward<scalar_t, 1, 32, FLASH, true>(args, stream);
  launch_backward<scalar_t, 1, 32, FLASH, false>(args, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const char* op, const at::Tensor& value_in,
                                                             const at::Tensor& spatial_shapes_in,
                                                             const at::Tensor& level_start_index_in,
                                                             const at::Tensor& sampling_in,
                                                             const at::Tensor& weights_in,
                                                             const at::Tensor& grad_output_in, int64_t num_points,
                                                             bool flash, bool deterministic) {
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto p = make_msda_params(op, value_in, spatial_shapes_in, level_start_index_in, sampling_in, weights_in,
                                  num_points, flash);
  TORCH_CHECK(value_in.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({p.batch, p.len_q, p.heads * p.channels}), op,
              ": grad_output must have the output's shape (N, Len_q, heads*D)");
  TORCH_CHECK(grad_output_in.device() == value_in.device(), op, ": grad_output must be on the device of value");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling = sampling_in.contiguous();
  const at::Tensor weights = flash ? at::Tensor() : weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous().to(value.scalar_type());
  // Every sampling gradient is written by the kernel; the value gradient is accumulated.
  at::Tensor grad_sampling = at::empty_like(sampling);
  at::Tensor grad_weights = flash ? at::Tensor() : at::empty_like(weights);
  if (grad_output.numel() == 0 || value.numel() == 0) {
    grad_sampling.zero_();
    if (grad_weights.defined()) grad_weights.zero_();
    return {at::zeros_like(value), grad_sampling, grad_weights};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const at::ScalarType acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    BackwardArgs<scalar_t> args;
    args.value = value.const_data_ptr<scalar_t>();
    args.spatial_shapes = spatial_shapes.const_data_ptr<int64_t>();
    args.level_start = level_start_index.const_data_ptr<int64_t>();
    args.sampling = sampling.const_data_ptr<scalar_t>();
    args.weights = flash ? nullptr : weights.const_data_ptr<scalar_t>();
    args.grad_output = grad_output.const_data_ptr<scalar_t>();
    args.grad_sampling = grad_sampling.mutable_data_ptr<scalar_t>();
    args.grad_weights = flash ? nullptr : grad_weights.mutable_data_ptr<scalar_t>();
    args.batch = p.batch;
    args.len_in = static_cast<int>(p.len_in);
    args.len_q = static_cast<int>(p.len_q);
    args.heads = static_cast<int>(p.heads);
    args.channels = static_cast<int>(p.channels);
    args.levels = static_cast<int>(p.levels);
    args.points = static_cast<int>(p.points);
    args.rows = static_cast<int>(p.len_q * p.heads);
    args.channel_blocks = 1;

    at::Tensor stash;
    if (flash && p.level_points() > kStashPoints) {
      stash = at::empty({p.batch * p.len_q * p.heads * p.level_points()}, value.options().dtype(acc_type));
      args.stash = stash.mutable_data_ptr<acc_t>();
    } else {
      args.stash = nullptr;
    }
    at::Tensor accum, fixed, absmax, fixed_scale;
    if (deterministic) {
      fixed = at::zeros(value.sizes(), value.options().dtype(at::kLong));
      absmax = at::zeros({2}, value.options().dtype(at::kFloat));
      fixed_scale = at::empty({1}, value.options().dtype(at::kDouble));
      // One term is p * w_corner * g_c, so |term| <= max|attention weight| * max|grad_output| (bilinear weights
      // are <= 1; the flash layout's softmax p <= 1), and a value element receives at most Len_q * P terms
      // (one corner per point of its level).
      fixed_point::launch_abs_max(grad_output.const_data_ptr<scalar_t>(), fixed_point::contiguous(grad_output.numel()),
                                  absmax.mutable_data_ptr<float>(), stream);
      if (!flash) {
        fixed_point::launch_abs_max(weights.const_data_ptr<scalar_t>(), fixed_point::contiguous(weights.numel()),
                                    absmax.mutable_data_ptr<float>() + 1, stream);
      }
      fixed_point::launch_scale(absmax.const_data_ptr<float>(), flash ? 1 : 2, static_cast<double>(p.len_q) * p.points,
                                fixed_scale.mutable_data_ptr<double>(), stream);
      args.grad_value = nullptr;
      args.grad_value_fixed = reinterpret_cast<long long*>(fixed.mutable_data_ptr<int64_t>());
      args.fixed_scale = fixed_scale.const_data_ptr<double>();
    } else {
      // The gradient itself for fp32/fp64 (common/cuda_buffers.cuh: a memset, for the host time).
      accum = cuda_buffers::zeros(value.sizes(), value.options().dtype(acc_type), stream);
      args.grad_value = accum.mutable_data_ptr<acc_t>();
      args.grad_value_fixed = nullptr;
      args.fixed_scale = nullptr;
    }

    constexpr int V = narrow_vector_width<scalar_t>();
    const bool vector_ok = p.channels % V == 0 && aligned16(args.value) && aligned16(args.grad_output);
    if (flash) {
      dispatch_backward<scalar_t, true, V>(args, vector_ok, stream);
    } else {
      dispatch_backward<scalar_t, false, V>(args, vector_ok, stream);
    }

    if (deterministic) {
      grad_value = at::empty_like(value);
      fixed_point::to_value<scalar_t>(fixed, fixed_scale, grad_value, stream);
    } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
      grad_value = accum;  // fp32/fp64: accumulated in place
    } else {
      grad_value = at::empty_like(value);
      cuda_buffers::round_into<scalar_t>(accum, grad_value, stream);
    }
  });
  return {grad_value, grad_sampling, grad_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    bool deterministic) {
  return backward_cuda("ms_deform_attn_backward", value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, grad_output, 0, false, deterministic);
}

std::tuple<at::Tensor, at::Tensor> flash_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc_attn, const at::Tensor& grad_output, int64_t num_points, bool deterministic) {
  auto grads = backward_cuda("flash_deform_attn_backward", value, spatial_shapes, level_start_index,
                             sampling_loc_attn, at::Tensor(), grad_output, num_points, true, deterministic);
  return {std::get<0>(grads), std::get<1>(grads)};
}

}  // namespace
}  // namespace msda_cuda

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) {
  m.impl("ms_deform_attn_backward", &msda_cuda::ms_deform_attn_backward_cuda);
  m.impl("flash_deform_attn_backward", &msda_cuda::flash_deform_attn_backward_cuda);
}

}  // namespace mmdcnv4
