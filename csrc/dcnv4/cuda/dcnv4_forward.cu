// DCNv4 forward on CUDA. One thread per (output pixel, group, V channels): it reads its group's offsets
// and weights once per point (the V-thread siblings read the same addresses, served by one broadcast),
// computes the bilinear weights in fp32 and accumulates V channels from 16-byte corner loads.
#include <torch/library.h>

#include "dcnv4/cuda/dcnv4_cuda.cuh"
#include "dcnv4/dcnv4_host.h"

namespace mmdcnv4 {
namespace cuda {
namespace {

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dcnv4_forward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                         scalar_t* __restrict__ output, const DCNv4Params p, const int threads, const int vecs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int item = blockIdx.x * blockDim.x + threadIdx.x;
  if (item >= threads) return;
  const int vec = item % vecs;
  const int pixel_group = item / vecs;
  const int g = pixel_group % p.group;
  const int pixel = pixel_group / p.group;
  const PixelIndex at = pixel_index(p, pixel);
  const int D = p.group_channels, K = p.points;
  const int64_t channel = static_cast<int64_t>(g) * D + static_cast<int64_t>(vec) * V;
  const scalar_t* om = offset_mask + static_cast<int64_t>(pixel) * p.om_channels + static_cast<int64_t>(g) * 3 * K;
  const scalar_t* image = value + static_cast<int64_t>(at.n) * p.height * p.width * p.channels + channel;
  const auto centre = window_centre<acc_t>(p, at.yo, at.xo);
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const int half_w = (p.dilation_w * (p.kernel_w - 1)) / 2, half_h = (p.dilation_h * (p.kernel_h - 1)) / 2;

  acc_t acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = acc_t(0);
  bool nan_point = false;
  int k = 0;
  for (int i = 0; i < p.kernel_w; ++i) {
    for (int j = 0; j < p.kernel_h; ++j) {
      if (p.remove_center && i == p.kernel_w / 2 && j == p.kernel_h / 2) continue;
      const acc_t x = centre.x + (acc_t(i * p.dilation_w - half_w) + static_cast<acc_t>(om[2 * k])) * scale;
      const acc_t y = centre.y + (acc_t(j * p.dilation_h - half_h) + static_cast<acc_t>(om[2 * k + 1])) * scale;
      const acc_t m = static_cast<acc_t>(om[2 * K + k]);
      ++k;
      const auto c = bilinear_corners<acc_t>(y, x, p.height, p.width);
      if (!c.used) {
        nan_point |= isnan(x) || isnan(y);  // NaN offsets propagate instead of vanishing
        continue;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (c.index[q] < 0) continue;
        const auto v = load_vec<scalar_t, V>(image + c.index[q] * p.channels);
        const acc_t w = m * c.weight[q];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += w * static_cast<acc_t>(v.v[e]);
      }
    }
  }
  Vec<scalar_t, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) out.v[e] = static_cast<scalar_t>(nan_point ? NAN : acc[e]);
  store_vec<scalar_t, V>(output + static_cast<int64_t>(pixel) * p.channels + channel, out);
}

template <typename scalar_t, int V>
void launch_forward(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output, const DCNv4Params& p,
                    cudaStream_t stream) {
  const int vecs = p.group_channels / V;
  const int64_t out_pixels = p.out_height * p.out_width;
  const int64_t threads_per_image = out_pixels * p.group * vecs;
  for_each_image_chunk(p.batch, threads_per_image, [&](int64_t first, int64_t count) {
    const int threads = static_cast<int>(count * threads_per_image);
    dcnv4_forward_kernel<scalar_t, V><<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(
        value + first * p.height * p.width * p.channels, offset_mask + first * out_pixels * p.om_channels,
        output + first * out_pixels * p.channels, p, threads, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dcnv4_forward_cuda(const at::Tensor& value_in, const at::Tensor& offset_mask_in, int64_t kernel_h,
                              int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w, int64_t group, double offset_scale,
                              bool remove_center) {
  const auto p = make_dcnv4_params(value_in, offset_mask_in, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                   pad_w, dilation_h, dilation_w, group, offset_scale, remove_center);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  at::Tensor output = at::empty({p.batch, p.out_height, p.out_width, p.channels}, value.options());
  if (output.numel() == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_forward_cuda", [&] {
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* om = offset_mask.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    constexpr int kWide = 16 / sizeof(scalar_t);
    if (pick_vector_width<scalar_t>(p.group_channels, {v, out}) == kWide) {
      launch_forward<scalar_t, kWide>(v, om, out, p, stream);
    } else {
      launch_forward<scalar_t, 1>(v, om, out, p, stream);
    }
  });
  return output;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) { m.impl("dcnv4_forward", &cuda::dcnv4_forward_cuda); }

}  // namespace mmdcnv4
