// Multi-scale deformable attention on the CPU, both layouts, forward and backward, multi-threaded with
// at::parallel_for.
//
// Forward: one task per (image, query, head) row, so a row's result never depends on the batch or the
// thread count. Backward: one task per (image, head); a task owns its slice of the value gradient and the
// sampling gradients of its rows, so the scatter needs no atomics and the result is deterministic at any
// thread count. The softmax of the flash layout runs in fp32 (fp64 for fp64 inputs), max-subtracted.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/ms_deform_attn_host.h"

namespace mmdcnv4 {
namespace {

// The level tables are read on the CPU here, so an inconsistent table is an error rather than a silently
// empty level (the CUDA kernels, which must not sync, zero such a level instead).
void check_levels_cpu(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t len_in,
                      const char* op) {
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    TORCH_CHECK(msda_level_ok(shapes[2 * l], shapes[2 * l + 1], starts[l], len_in), op, ": level ", int_text(l),
                " (H=", int_text(shapes[2 * l]), ", W=", int_text(shapes[2 * l + 1]), ", start=",
                int_text(starts[l]), ") does not fit in a value of Len_in=", int_text(len_in));
  }
}

// Attention probabilities of one row: the given weights (mmcv layout) or the softmax of the logits.
template <typename scalar_t, typename acc_t>
void row_probabilities(const scalar_t* weights, int64_t count, bool softmax, acc_t* prob) {
  if (!softmax) {
    for (int64_t j = 0; j < count; ++j) prob[j] = static_cast<acc_t>(weights[j]);
    return;
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    const acc_t x = static_cast<acc_t>(weights[j]);
    if (x > m) m = x;
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < count; ++j) {
    prob[j] = std::exp(static_cast<acc_t>(weights[j]) - m);
    sum += prob[j];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t j = 0; j < count; ++j) prob[j] *= inv;
}

struct Level {
  int32_t height, width, start;
};

std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  std::vector<Level> levels(spatial_shapes.size(0));
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = {static_cast<int32_t>(shapes[2 * l]), static_cast<int32_t>(shapes[2 * l + 1]),
                 static_cast<int32_t>(starts[l])};
  }
  return levels;
}

// sampling: locations of the row at sampling + 2j (x, y); weights (or logits) at weights + j.
template <typename scalar_t>
void forward_cpu_kernel(const scalar_t* value, const std::vector<Level>& levels, const scalar_t* sampling,
                        const scalar_t* attention_weights, scalar_t* output, const MSDAParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = p.batch * p.len_q * p.heads;
  const int64_t D = p.channels, LP = p.level_points(), row_stride = p.heads * p.channels;
  const int64_t grain = std::max<int64_t>(1, 8192 / (LP * (D + 8)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D), prob(LP);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / (p.len_q * p.heads), h = row % p.heads;
      const scalar_t* image = value + n * p.len_in * row_stride + h * D;
      const scalar_t* loc = sampling + row * p.sampling_row();
      const scalar_t* weights = p.flash ? loc + 2 * LP : attention_weights + row * LP;
      row_probabilities(weights, LP, p.flash, prob.data());
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < LP; ++j) {
        const Level& lv = levels[j / p.points];
        const acc_t x = static_cast<acc_t>(loc[2 * j]) * lv.width - acc_t(0.5);
        const acc_t y = static_cast<acc_t>(loc[2 * j + 1]) * lv.height - acc_t(0.5);
        const auto c = msda_corners<acc_t>(x, y, lv.height, lv.width, lv.start);
        if (c.nan) {  // NaN locations propagate instead of vanishing
          std::fill(acc.begin(), acc.end(), std::numeric_limits<acc_t>::quiet_NaN());
          continue;
        }
        if (!c.used) continue;
        for (int q = 0; q < 4; ++q) {
          if (c.index[q] < 0) continue;
          const scalar_t* v = image + c.index[q] * row_stride;
          const acc_t w = prob[j] * c.weight[q];
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<acc_t>(v[d]);
        }
      }
      scalar_t* out = output + row * D;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// grad_value_acc is the value gradient itself (fp32/fp64) or an fp32 buffer (fp16/bf16), zero-filled.
// grad_sampling gets every location gradient (and the logit gradients in the flash layout);
// grad_weights the attention-weight gradients of the mmcv layout.
template <typename scalar_t, typename acc_t>
void backward_cpu_kernel(const scalar_t* value, const std::vector<Level>& levels, const scalar_t* sampling,
                         const scalar_t* attention_weights, const scalar_t* grad_output, acc_t* grad_value_acc,
                         scalar_t* grad_sampling, scalar_t* grad_weights, const MSDAParams& p) {
  const int64_t D = p.channels, LP = p.level_points(), row_stride = p.heads * p.channels;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob(LP), a(LP), go(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.heads, h = task % p.heads;
      const scalar_t* image = value + n * p.len_in * row_stride + h * D;
      acc_t* grad_image = grad_value_acc + n * p.len_in * row_stride + h * D;
      for (int64_t q = 0; q < p.len_q; ++q) {
        const int64_t row = (n * p.len_q + q) * p.heads + h;
        const scalar_t* loc = sampling + row * p.sampling_row();
        const scalar_t* weights = p.flash ? loc + 2 * LP : attention_weights + row * LP;
        scalar_t* grad_loc = grad_sampling + row * p.sampling_row();
        scalar_t* grad_w = p.flash ? grad_loc + 2 * LP : grad_weights + row * LP;
        row_probabilities(weights, LP, p.flash, prob.data());
        for (int64_t d = 0; d < D; ++d) go[d] = static_cast<acc_t>(grad_output[row * D + d]);
        for (int64_t j = 0; j < LP; ++j) {
          const Level& lv = levels[j / p.points];
          const acc_t x = static_cast<acc_t>(loc[2 * j]) * lv.width - acc_t(0.5);
          const acc_t y = static_cast<acc_t>(loc[2 * j + 1]) * lv.height - acc_t(0.5);
          const auto c = msda_corners<acc_t>(x, y, lv.height, lv.width, lv.start);
          acc_t gx = 0, gy = 0;
          a[j] = c.nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
          if (c.used) {
            acc_t s[4] = {0, 0, 0, 0};
            for (int k = 0; k < 4; ++k) {
              if (c.index[k] < 0) continue;
              const scalar_t* v = image + c.index[k] * row_stride;
              acc_t* gv = grad_image + c.index[k] * row_stride;
              const acc_t w = prob[j] * c.weight[k];
              acc_t sk = 0;
              for (int64_t d = 0; d < D; ++d) {
                sk += go[d] * static_cast<acc_t>(v[d]);
                gv[d] += w * go[d];
              }
              s[k] = sk;
            }
            const auto g = msda_point_grad<acc_t>(s, c.weight, c.lx, c.ly);
            a[j] = g.a;
            gx = prob[j] * acc_t(lv.width) * g.gx;
            gy = prob[j] * acc_t(lv.height) * g.gy;
          }
          grad_loc[2 * j] = static_cast<scalar_t>(gx);
          grad_loc[2 * j + 1] = static_cast<scalar_t>(gy);
        }
        if (p.flash) {  // d logit_i = p_i (a_i - sum_j p_j a_j)
          acc_t dot = 0;
          for (int64_t j = 0; j < LP; ++j) dot += prob[j] * a[j];
          for (int64_t j = 0; j < LP; ++j) grad_w[j] = static_cast<scalar_t>(prob[j] * (a[j] - dot));
        } else {
          for (int64_t j = 0; j < LP; ++j) grad_w[j] = static_cast<scalar_t>(a[j]);
        }
      }
    }
  });
}

// fp32/fp64 accumulate straight into the value gradient; fp16/bf16 into an fp32 buffer, rounded once.
template <typename scalar_t>
void run_backward(const at::Tensor& value, const std::vector<Level>& levels, const at::Tensor& sampling,
                  const at::Tensor& weights, const at::Tensor& grad_output, at::Tensor& grad_value,
                  at::Tensor& grad_sampling, at::Tensor& grad_weights, const MSDAParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor buffer;
  acc_t* grad_value_acc;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    grad_value_acc = grad_value.mutable_data_ptr<scalar_t>();
  } else {
    buffer = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
    grad_value_acc = buffer.mutable_data_ptr<acc_t>();
  }
  backward_cpu_kernel<scalar_t, acc_t>(value.const_data_ptr<scalar_t>(), levels, sampling.const_data_ptr<scalar_t>(),
                                       p.flash ? nullptr : weights.const_data_ptr<scalar_t>(),
                                       grad_output.const_data_ptr<scalar_t>(), grad_value_acc,
                                       grad_sampling.mutable_data_ptr<scalar_t>(),
                                       p.flash ? nullptr : grad_weights.mutable_data_ptr<scalar_t>(), p);
  if (buffer.defined()) grad_value.copy_(buffer);
}

at::Tensor forward_cpu(const char* op, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                       const at::Tensor& level_start_index_in, const at::Tensor& sampling_in,
                       const at::Tensor& weights_in, int64_t num_points, bool flash) {
  const auto p = make_msda_params(op, value_in, spatial_shapes_in, level_start_index_in, sampling_in, weights_in,
                                  num_points, flash);
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  check_levels_cpu(spatial_shapes, level_start_index, p.len_in, op);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor sampling = sampling_in.contiguous();
  const at::Tensor weights = flash ? at::Tensor() : weights_in.contiguous();
  at::Tensor output = at::empty({p.batch, p.len_q, p.heads * p.channels}, value.options());
  if (output.numel() == 0) return output;
  const auto levels = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_cpu_kernel<scalar_t>(value.const_data_ptr<scalar_t>(), levels, sampling.const_data_ptr<scalar_t>(),
                                 flash ? nullptr : weights.const_data_ptr<scalar_t>(),
                                 output.mutable_data_ptr<scalar_t>(), p);
  });
  return output;
}

// Returns (grad_value, grad_sampling, grad_weights); grad_weights is undefined in the flash layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const char* op, const at::Tensor& value_in,
                                                            const at::Tensor& spatial_shapes_in,
                                                            const at::Tensor& level_start_index_in,
                                                            const at::Tensor& sampling_in,
                                                            const at::Tensor& weights_in,
                                                            const at::Tensor& grad_output_in, int64_t num_points,
                                                            bool flash) {
  const auto p = make_msda_params(op, value_in, spatial_shapes_in, level_start_index_in, sampling_in, weights_in,
                                  num_points, flash);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({p.batch, p.len_q, p.heads * p.channels}), op,
              ": grad_output must have the output's shape (N, Len_q, heads*D)");
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  check_levels_cpu(spatial_shapes, level_start_index, p.len_in, op);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor sampling = sampling_in.contiguous();
  const at::Tensor weights = flash ? at::Tensor() : weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous().to(value.scalar_type());
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_sampling = at::zeros_like(sampling);
  at::Tensor grad_weights = flash ? at::Tensor() : at::zeros_like(weights);
  if (grad_output.numel() == 0 || value.numel() == 0) return {grad_value, grad_sampling, grad_weights};
  const auto levels = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    run_backward<scalar_t>(value, levels, sampling, weights, grad_output, grad_value, grad_sampling, grad_weights, p);
  });
  return {grad_value, grad_sampling, grad_weights};
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  return forward_cpu("ms_deform_attn_forward", value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights, 0, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  return backward_cpu("ms_deform_attn_backward", value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, grad_output, 0, false);
}

at::Tensor flash_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index, const at::Tensor& sampling_loc_attn,
                                         int64_t num_points) {
  return forward_cpu("flash_deform_attn_forward", value, spatial_shapes, level_start_index, sampling_loc_attn,
                     at::Tensor(), num_points, true);
}

std::tuple<at::Tensor, at::Tensor> flash_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc_attn, const at::Tensor& grad_output, int64_t num_points, bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  auto grads = backward_cpu("flash_deform_attn_backward", value, spatial_shapes, level_start_index,
                            sampling_loc_attn, at::Tensor(), grad_output, num_points, true);
  return {std::get<0>(grads), std::get<1>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdcnv4, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
  m.impl("flash_deform_attn_forward", &flash_deform_attn_forward_cpu);
  m.impl("flash_deform_attn_backward", &flash_deform_attn_backward_cpu);
}

}  // namespace mmdcnv4
