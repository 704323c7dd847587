// Host-side checks shared by the CPU and CUDA implementations of the multi-scale deformable attention
// ops. The Python wrapper (mmdcnv4/ops/ms_deform_attn.py) already gives friendly errors, including the
// checks of the level tables' contents; these guard direct torch.ops callers and read no device memory.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "common/message.h"
#include "ms_deform_attn/ms_deform_attn_params.h"

namespace mmdcnv4 {

// flash: sampling is sampling_loc_attn (N, Len_q, heads, 3*L*P) and attention_weights is undefined;
// otherwise sampling is sampling_locations (N, Len_q, heads, L, P, 2) with attention_weights
// (N, Len_q, heads, L, P), and num_points is ignored.
inline MSDAParams make_msda_params(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling,
                                   const at::Tensor& attention_weights, int64_t num_points, bool flash) {
  TORCH_CHECK(value.dim() == 4, op, ": value must be (N, Len_in, heads, D), got ", shape_text(value.sizes()));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && spatial_shapes.size(0) >= 1, op,
              ": spatial_shapes must be (L, 2) with L >= 1, got ", shape_text(spatial_shapes.sizes()));
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0), op,
              ": level_start_index must be (L,), got ", shape_text(level_start_index.sizes()));
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong, op,
              ": spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(spatial_shapes.device() == value.device() && level_start_index.device() == value.device(), op,
              ": spatial_shapes and level_start_index must be on the device of value");
  TORCH_CHECK(sampling.device() == value.device(), op, ": the sampling tensor must be on the device of value");
  TORCH_CHECK(sampling.scalar_type() == value.scalar_type(), op, ": the sampling tensor must have value's dtype");
  MSDAParams p;
  p.flash = flash;
  p.batch = value.size(0);
  p.len_in = value.size(1);
  p.heads = value.size(2);
  p.channels = value.size(3);
  p.levels = spatial_shapes.size(0);
  if (flash) {
    TORCH_CHECK(num_points >= 1, op, ": num_points must be >= 1, got ", int_text(num_points));
    p.points = num_points;
    TORCH_CHECK(sampling.dim() == 4 && sampling.size(0) == p.batch && sampling.size(2) == p.heads &&
                    sampling.size(3) == 3 * p.levels * p.points,
                op, ": sampling_loc_attn must be (N, Len_q, heads, 3*L*P) = (", int_text(p.batch), ", Len_q, ",
                int_text(p.heads), ", ", int_text(3 * p.levels * p.points), "), got ", shape_text(sampling.sizes()));
  } else {
    TORCH_CHECK(sampling.dim() == 6 && sampling.size(0) == p.batch && sampling.size(2) == p.heads &&
                    sampling.size(3) == p.levels && sampling.size(4) >= 1 && sampling.size(5) == 2,
                op, ": sampling_locations must be (N, Len_q, heads, L, P, 2), got ", shape_text(sampling.sizes()));
    p.points = sampling.size(4);
    TORCH_CHECK(attention_weights.defined() && attention_weights.sizes() == sampling.sizes().slice(0, 5), op,
                ": attention_weights must be (N, Len_q, heads, L, P) = ", shape_text(sampling.sizes().slice(0, 5)));
    TORCH_CHECK(attention_weights.device() == value.device(), op,
                ": attention_weights must be on the device of value");
    TORCH_CHECK(attention_weights.scalar_type() == value.scalar_type(), op,
                ": attention_weights must have value's dtype");
  }
  p.len_q = sampling.size(1);
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(p.len_in < int_max, op, ": Len_in must be below 2^31, got ", int_text(p.len_in));
  TORCH_CHECK(p.len_q * p.heads * std::max<int64_t>(p.channels, 1) < int_max, op,
              ": Len_q * heads * D must be below 2^31");
  TORCH_CHECK(p.levels * p.points < int_max / 4, op, ": too many levels * points");
  return p;
}

}  // namespace mmdcnv4
