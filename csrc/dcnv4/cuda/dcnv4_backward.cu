// DCNv4 backward on CUDA.
//
// Mapping: T lanes (a power of two <= 32, inside one warp) per (output pixel, group); lane l handles the
// channel vectors l, l + T, ... of the group. Per point, each lane forms partial sums of the weight and
// offset gradients over its channels; a butterfly of warp shuffles reduces them over the T lanes and
// lane 0 writes them, so those gradients need no atomics and are deterministic.
//
// The value gradient is a scatter (many output points hit one input pixel). By default each lane adds
// its contributions with fp32 atomics (into the gradient itself for fp32/fp64, into an fp32 buffer
// rounded once at the end for fp16/bf16). With torch.use_deterministic_algorithms(True), contributions
// are instead rounded to 64-bit fixed point and added with integer atomics, which are associative, so
// the result does not depend on the order of the additions. The fixed-point scale is a power of two
// chosen on the device from max|grad_output| * max|weight| * (Ho * Wo * K) (a bound on any partial sum),
// which leaves more than 40 bits of precision below the largest possible contribution; it costs an int64
// buffer (twice the fp32 one) and two reductions, and needs no host synchronisation.
#include <torch/library.h>

#include "dcnv4/cuda/dcnv4_cuda.cuh"
#include "dcnv4/dcnv4_host.h"

namespace mmdcnv4 {
namespace cuda {
namespace {

template <typename acc_t>
struct FloatAtomicAdd {
  acc_t* base;
  __device__ __forceinline__ void operator()(int64_t index, acc_t value) const { atomicAdd(base + index, value); }
};

struct FixedPointAtomicAdd {
  unsigned long long* base;
  const double* scale;  // device scalar, see the file comment
  __device__ __forceinline__ void operator()(int64_t index, double value) const {
    const long long fixed = __double2ll_rn(value * (*scale));
    atomicAdd(base + index, static_cast<unsigned long long>(fixed));
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t reduce_lanes(acc_t value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset, lanes);
  return value;
}

template <typename scalar_t, int V, typename Accumulate>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dcnv4_backward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                          const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_offset_mask,
                          const Accumulate accumulate, const DCNv4Params p, const int pixel_groups,
                          const int lanes, const int vecs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int item = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = item & (lanes - 1);
  const int pixel_group = item / lanes;
  // Threads past the end stay to take part in the shuffles; they read and write nothing.
  const bool active = pixel_group < pixel_groups;
  const int g = active ? pixel_group % p.group : 0;
  const int pixel = active ? pixel_group / p.group : 0;
  const PixelIndex at = pixel_index(p, pixel);
  const int D = p.group_channels, K = p.points;
  const int64_t channel0 = static_cast<int64_t>(g) * D;
  const int64_t om_offset = static_cast<int64_t>(pixel) * p.om_channels + static_cast<int64_t>(g) * 3 * K;
  const scalar_t* om = offset_mask + om_offset;
  const int64_t image_offset = static_cast<int64_t>(at.n) * p.height * p.width * p.channels + channel0;
  const scalar_t* image = value + image_offset;
  const scalar_t* gout = grad_output + static_cast<int64_t>(pixel) * p.channels + channel0;
  const auto centre = window_centre<acc_t>(p, at.yo, at.xo);
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const int half_w = (p.dilation_w * (p.kernel_w - 1)) / 2, half_h = (p.dilation_h * (p.kernel_h - 1)) / 2;

  int k = 0;
  for (int i = 0; i < p.kernel_w; ++i) {
    for (int j = 0; j < p.kernel_h; ++j) {
      if (p.remove_center && i == p.kernel_w / 2 && j == p.kernel_h / 2) continue;
      acc_t x = 0, y = 0, m = 0;
      if (active) {
        x = centre.x + (acc_t(i * p.dilation_w - half_w) + static_cast<acc_t>(om[2 * k])) * scale;
        y = centre.y + (acc_t(j * p.dilation_h - half_h) + static_cast<acc_t>(om[2 * k + 1])) * scale;
        m = static_cast<acc_t>(om[2 * K + k]);
      }
      const auto c = bilinear_corners<acc_t>(y, x, p.height, p.width);
      const bool used = active && c.used;
      acc_t grad_m = 0, grad_x = 0, grad_y = 0;
      if (used) {
        const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
        for (int vec = lane; vec < vecs; vec += lanes) {
          const int64_t ch = static_cast<int64_t>(vec) * V;
          const auto go = load_vec<scalar_t, V>(gout + ch);
          Vec<scalar_t, V> corner[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (c.index[q] >= 0) {
              corner[q] = load_vec<scalar_t, V>(image + c.index[q] * p.channels + ch);
            } else {
#pragma unroll
              for (int e = 0; e < V; ++e) corner[q].v[e] = scalar_t(0);
            }
          }
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const acc_t g_e = static_cast<acc_t>(go.v[e]);
            const acc_t v00 = static_cast<acc_t>(corner[0].v[e]), v01 = static_cast<acc_t>(corner[1].v[e]);
            const acc_t v10 = static_cast<acc_t>(corner[2].v[e]), v11 = static_cast<acc_t>(corner[3].v[e]);
            grad_m += g_e * (c.weight[0] * v00 + c.weight[1] * v01 + c.weight[2] * v10 + c.weight[3] * v11);
            grad_x += g_e * (hy * (v01 - v00) + c.ly * (v11 - v10));
            grad_y += g_e * (hx * (v10 - v00) + c.lx * (v11 - v01));
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (c.index[q] < 0) continue;
            const acc_t w = m * c.weight[q];
            const int64_t base = image_offset + c.index[q] * p.channels + ch;
#pragma unroll
            for (int e = 0; e < V; ++e) accumulate(base + e, w * static_cast<acc_t>(go.v[e]));
          }
        }
      }
      grad_m = reduce_lanes(grad_m, lanes);
      grad_x = reduce_lanes(grad_x, lanes);
      grad_y = reduce_lanes(grad_y, lanes);
      if (active && lane == 0) {
        scalar_t* gom = grad_offset_mask + om_offset;
        if (!c.used && (isnan(x) || isnan(y))) grad_m = NAN;
        gom[2 * k] = static_cast<scalar_t>(grad_x * scale * m);
        gom[2 * k + 1] = static_cast<scalar_t>(grad_y * scale * m);
        gom[2 * K + k] = static_cast<scalar_t>(grad_m);
      }
      ++k;
    }
  }
}

int lanes_for(int vecs) {
  int lanes = 1;
  while (lanes < vecs && lanes < 32) lanes *= 2;
  return lanes;
}

template <typename scalar_t, int V, typename Accumulate>
void launch_backward(const scalar_t* value, const scalar_t* offset_mask, const scalar_t* grad_output,
                     scalar_t* grad_offset_mask, Accumulate accumulate, const DCNv4Params& p, cudaStream_t stream) {
  const int vecs = p.group_channels / V;
  const int lanes = lanes_for(vecs);
  const int64_t out_pixels = p.out_height * p.out_width;
  const int64_t groups_per_image = out_pixels * p.group;
  for_each_image_chunk(p.batch, groups_per_image * lanes, [&](int64_t first, int64_t count) {
    const int pixel_groups = static_cast<int>(count * groups_per_image);
    // The accumulator indexes the whole value gradient: offset its base like the inputs.
    Accumulate chunk = accumulate;
    chunk.base += first * p.height * p.width * p.channels;
    dcnv4_backward_kernel<scalar_t, V, Accumulate>
        <<<blocks_for(static_cast<int64_t>(pixel_groups) * lanes), kThreadsPerBlock, 0, stream>>>(
            value + first * p.height * p.width * p.channels, offset_mask + first * out_pixels * p.om_channels,
            grad_output + first * out_pixels * p.channels, grad_offset_mask + first * out_pixels * p.om_channels,
            chunk, p, pixel_groups, lanes, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename Accumulate>
void dispatch_vector_width(const at::Tensor& value, const at::Tensor& offset_mask, const at::Tensor& grad_output,
                           at::Tensor& grad_offset_mask, Accumulate accumulate, const DCNv4Params& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  constexpr int kWide = 16 / sizeof(scalar_t);
  if (pick_vector_width<scalar_t>(p.group_channels, {v, go}) == kWide) {
    launch_backward<scalar_t, kWide>(v, offset_mask.const_data_ptr<scalar_t>(), go,
                                     grad_offset_mask.mutable_data_ptr<scalar_t>(), accumulate, p, stream);
  } else {
    launch_backward<scalar_t, 1>(v, offset_mask.const_data_ptr<scalar_t>(), go,
                                 grad_offset_mask.mutable_data_ptr<scalar_t>(), accumulate, p, stream);
  }
}

// Power-of-two fixed-point scale on the device (see the file comment). A non-finite bound gives a NaN
// scale, so non-finite gradients turn the value gradient into NaN rather than into wrapped integers.
at::Tensor fixed_point_scale(const at::Tensor& offset_mask, const at::Tensor& grad_output, const DCNv4Params& p) {
  const int64_t K = p.points;
  const at::Tensor weights = offset_mask.narrow(3, 0, 3 * p.group * K)
                                 .view({p.batch, p.out_height, p.out_width, p.group, 3 * K})
                                 .narrow(4, 2 * K, K);
  const at::Tensor max_weight = weights.abs().amax().to(at::kDouble);
  const at::Tensor max_grad = grad_output.abs().amax().to(at::kDouble);
  const double count = static_cast<double>(p.out_height * p.out_width * K);
  const at::Tensor bound = (max_weight * max_grad * count).clamp_min(1e-300);
  at::Tensor scale = at::exp2(at::floor(62.0 - at::log2(bound)));
  return at::where(at::isfinite(bound), scale, at::full_like(scale, std::numeric_limits<double>::quiet_NaN()));
}

// Runs the kernel with the accumulator the mode and dtype call for, and returns the value gradient.
template <typename scalar_t>
at::Tensor value_gradient(const at::Tensor& value, const at::Tensor& offset_mask, const at::Tensor& grad_output,
                          at::Tensor& grad_offset_mask, const DCNv4Params& p, bool deterministic) {
  using acc_t = at::opmath_type<scalar_t>;
  if (deterministic) {
    at::Tensor fixed = at::zeros(value.sizes(), value.options().dtype(at::kLong));
    const at::Tensor scale = fixed_point_scale(offset_mask, grad_output, p);
    FixedPointAtomicAdd add{reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>()),
                            scale.const_data_ptr<double>()};
    dispatch_vector_width<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, add, p);
    return (fixed.to(at::kDouble) / scale).to(value.scalar_type());
  }
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    at::Tensor grad_value = at::zeros_like(value);
    FloatAtomicAdd<acc_t> add{grad_value.mutable_data_ptr<scalar_t>()};
    dispatch_vector_width<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, add, p);
    return grad_value;
  } else {
    at::Tensor buffer = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
    FloatAtomicAdd<acc_t> add{buffer.mutable_data_ptr<float>()};
    dispatch_vector_width<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, add, p);
    return buffer.to(value.scalar_type());
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
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous().to(value.scalar_type());
  // Zeros: the padded tail of offset_mask gets zero gradient.
  at::Tensor grad_offset_mask = at::zeros_like(offset_mask);
  if (grad_output.numel() == 0 || value.numel() == 0) return {at::zeros_like(value), grad_offset_mask};

  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_backward_cuda", [&] {
    grad_value = value_gradient<scalar_t>(value, offset_mask, grad_output, grad_offset_mask, p, deterministic);
  });
  return {grad_value, grad_offset_mask};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) { m.impl("dcnv4_backward", &cuda::dcnv4_backward_cuda); }

}  // namespace mmdcnv4
