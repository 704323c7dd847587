// DCNv4 on the CPU, forward and backward, multi-threaded with at::parallel_for.
//
// Forward: one task per output pixel, so a pixel's result never depends on the batch or the thread
// count. Backward: one task per (image, group); a task owns its slice of the value gradient, so the
// scatter needs no atomics and the result is deterministic at any thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "dcnv4/dcnv4_host.h"

namespace mmdcnv4 {
namespace {

template <typename scalar_t>
void forward_cpu_kernel(const scalar_t* value, const scalar_t* offset_mask, scalar_t* output,
                        const DCNv4Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels = p.batch * p.out_height * p.out_width;
  const int D = p.group_channels, K = p.points;
  // Enough pixels per task to amortise scheduling for small groups.
  const int64_t grain = std::max<int64_t>(1, 4096 / (p.channels * K + 1));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (p.out_height * p.out_width);
      const int64_t rem = pix % (p.out_height * p.out_width);
      const int64_t yo = rem / p.out_width, xo = rem % p.out_width;
      const auto centre = window_centre<acc_t>(p, yo, xo);
      const scalar_t* image = value + n * p.height * p.width * p.channels;
      for (int g = 0; g < p.group; ++g) {
        const scalar_t* om = offset_mask + pix * p.om_channels + static_cast<int64_t>(g) * 3 * K;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        int k = 0;
        for (int i = 0; i < p.kernel_w; ++i) {
          for (int j = 0; j < p.kernel_h; ++j) {
            if (p.remove_center && i == p.kernel_w / 2 && j == p.kernel_h / 2) continue;
            const auto pos = sampling_position(p, centre, i, j, acc_t(om[2 * k]), acc_t(om[2 * k + 1]));
            const acc_t x = pos.x, y = pos.y;
            const acc_t m = acc_t(om[2 * K + k]);
            ++k;
            const auto c = bilinear_corners<acc_t>(y, x, p.height, p.width);
            if (!c.used) {
              if (std::isnan(x) || std::isnan(y)) {  // NaN offsets propagate instead of vanishing
                for (int d = 0; d < D; ++d) acc[d] = std::numeric_limits<acc_t>::quiet_NaN();
              }
              continue;
            }
            for (int q = 0; q < 4; ++q) {
              if (c.index[q] < 0) continue;
              const scalar_t* v = image + c.index[q] * p.channels + static_cast<int64_t>(g) * D;
              const acc_t w = m * c.weight[q];
              for (int d = 0; d < D; ++d) acc[d] += w * acc_t(v[d]);
            }
          }
        }
        scalar_t* out = output + pix * p.channels + static_cast<int64_t>(g) * D;
        for (int d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// grad_value_acc is either the value gradient itself (fp32/fp64) or an fp32 buffer (fp16/bf16).
template <typename scalar_t, typename acc_t>
void backward_cpu_kernel(const scalar_t* value, const scalar_t* offset_mask, const scalar_t* grad_output,
                         acc_t* grad_value_acc, scalar_t* grad_offset_mask, const DCNv4Params& p) {
  const int D = p.group_channels, K = p.points;
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const int64_t out_pixels = p.out_height * p.out_width;
  at::parallel_for(0, p.batch * p.group, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(4 * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.group;
      const int g = static_cast<int>(task % p.group);
      const int64_t channel0 = static_cast<int64_t>(g) * D;
      const scalar_t* image = value + n * p.height * p.width * p.channels;
      acc_t* grad_image = grad_value_acc + n * p.height * p.width * p.channels;
      for (int64_t rem = 0; rem < out_pixels; ++rem) {
        const int64_t pix = n * out_pixels + rem;
        const int64_t yo = rem / p.out_width, xo = rem % p.out_width;
        const auto centre = window_centre<acc_t>(p, yo, xo);
        const scalar_t* om = offset_mask + pix * p.om_channels + static_cast<int64_t>(g) * 3 * K;
        scalar_t* gom = grad_offset_mask + pix * p.om_channels + static_cast<int64_t>(g) * 3 * K;
        const scalar_t* gout = grad_output + pix * p.channels + channel0;
        int k = 0;
        for (int i = 0; i < p.kernel_w; ++i) {
          for (int j = 0; j < p.kernel_h; ++j) {
            if (p.remove_center && i == p.kernel_w / 2 && j == p.kernel_h / 2) continue;
            const auto pos = sampling_position(p, centre, i, j, acc_t(om[2 * k]), acc_t(om[2 * k + 1]));
            const acc_t x = pos.x, y = pos.y;
            const acc_t m = acc_t(om[2 * K + k]);
            const auto c = bilinear_corners<acc_t>(y, x, p.height, p.width);
            acc_t grad_m = 0, grad_x = 0, grad_y = 0;
            if (c.used) {
              for (int q = 0; q < 4; ++q) {
                const scalar_t* src = image + c.index[q] * p.channels + channel0;
                for (int d = 0; d < D; ++d) v[q * D + d] = c.index[q] >= 0 ? acc_t(src[d]) : acc_t(0);
              }
              const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
              for (int d = 0; d < D; ++d) {
                const acc_t go = acc_t(gout[d]);
                const acc_t v00 = v[d], v01 = v[D + d], v10 = v[2 * D + d], v11 = v[3 * D + d];
                grad_m += go * (c.weight[0] * v00 + c.weight[1] * v01 + c.weight[2] * v10 + c.weight[3] * v11);
                grad_x += go * (hy * (v01 - v00) + c.ly * (v11 - v10));
                grad_y += go * (hx * (v10 - v00) + c.lx * (v11 - v01));
              }
              for (int q = 0; q < 4; ++q) {
                if (c.index[q] < 0) continue;
                acc_t* dst = grad_image + c.index[q] * p.channels + channel0;
                const acc_t w = m * c.weight[q];
                for (int d = 0; d < D; ++d) dst[d] += w * acc_t(gout[d]);
              }
              grad_x *= scale * m;
              grad_y *= scale * m;
            } else if (std::isnan(x) || std::isnan(y)) {
              grad_m = std::numeric_limits<acc_t>::quiet_NaN();
            }
            gom[2 * k] = static_cast<scalar_t>(grad_x);
            gom[2 * k + 1] = static_cast<scalar_t>(grad_y);
            gom[2 * K + k] = static_cast<scalar_t>(grad_m);
            ++k;
          }
        }
      }
    }
  });
}

// fp32/fp64 accumulate straight into the value gradient; fp16/bf16 into an fp32 buffer, rounded once.
template <typename scalar_t>
void run_backward(const at::Tensor& value, const at::Tensor& offset_mask, const at::Tensor& grad_output,
                  at::Tensor& grad_value, at::Tensor& grad_offset_mask, const DCNv4Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* grad_value_acc;
  at::Tensor buffer;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    grad_value_acc = grad_value.mutable_data_ptr<scalar_t>();
  } else {
    buffer = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
    grad_value_acc = buffer.mutable_data_ptr<acc_t>();
  }
  backward_cpu_kernel<scalar_t, acc_t>(value.const_data_ptr<scalar_t>(), offset_mask.const_data_ptr<scalar_t>(),
                                       grad_output.const_data_ptr<scalar_t>(), grad_value_acc,
                                       grad_offset_mask.mutable_data_ptr<scalar_t>(), p);
  if (buffer.defined()) grad_value.copy_(buffer);
}

at::Tensor dcnv4_forward_cpu(const at::Tensor& value_in, const at::Tensor& offset_mask_in, int64_t kernel_h,
                             int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                             int64_t dilation_h, int64_t dilation_w, int64_t group, double offset_scale,
                             bool remove_center) {
  const auto p = make_dcnv4_params(value_in, offset_mask_in, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                   pad_w, dilation_h, dilation_w, group, offset_scale, remove_center);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  at::Tensor output = at::empty({p.batch, p.out_height, p.out_width, p.channels}, value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_forward_cpu", [&] {
    forward_cpu_kernel<scalar_t>(value.const_data_ptr<scalar_t>(), offset_mask.const_data_ptr<scalar_t>(),
                                 output.mutable_data_ptr<scalar_t>(), p);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cpu(
    const at::Tensor& value_in, const at::Tensor& offset_mask_in, const at::Tensor& grad_output_in,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, double offset_scale, bool remove_center,
    bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  const auto p = make_dcnv4_params(value_in, offset_mask_in, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                   pad_w, dilation_h, dilation_w, group, offset_scale, remove_center);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({p.batch, p.out_height, p.out_width, p.channels}),
              "dcnv4_backward: grad_output must have the output's shape");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous().to(value.scalar_type());
  // Zeros: the padded tail of offset_mask gets zero gradient, and the value gradient is accumulated.
  at::Tensor grad_offset_mask = at::zeros_like(offset_mask);
  at::Tensor grad_value = at::zeros_like(value);
  if (grad_output.numel() == 0 || value.numel() == 0) return {grad_value, grad_offset_mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_backward_cpu", [&] {
    run_backward<scalar_t>(value, offset_mask, grad_output, grad_value, grad_offset_mask, p);
  });
  return {grad_value, grad_offset_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdcnv4, CPU, m) {
  m.impl("dcnv4_forward", &dcnv4_forward_cpu);
  m.impl("dcnv4_backward", &dcnv4_backward_cpu);
}

}  // namespace mmdcnv4
