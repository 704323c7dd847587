// Host-side checks shared by the CPU and CUDA implementations of the DCNv4 ops. The Python wrapper
// (mmdcnv4/ops/dcnv4.py) already gives friendly errors; these guard direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>

#include "common/message.h"
#include "dcnv4/dcnv4_params.h"

namespace mmdcnv4 {

inline DCNv4Params make_dcnv4_params(const at::Tensor& value, const at::Tensor& offset_mask, int64_t kernel_h,
                                     int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                     int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                                     double offset_scale, bool remove_center) {
  TORCH_CHECK(value.dim() == 4, "dcnv4: value must be (N, H, W, C), got ", shape_text(value.sizes()));
  TORCH_CHECK(offset_mask.dim() == 4, "dcnv4: offset_mask must be (N, Ho, Wo, P), got ",
              shape_text(offset_mask.sizes()));
  TORCH_CHECK(value.scalar_type() == offset_mask.scalar_type(), "dcnv4: value and offset_mask dtypes differ");
  TORCH_CHECK(value.device() == offset_mask.device(), "dcnv4: value and offset_mask devices differ");
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && stride_h >= 1 && stride_w >= 1 && dilation_h >= 1 &&
                  dilation_w >= 1 && pad_h >= 0 && pad_w >= 0,
              "dcnv4: bad kernel_size/stride/dilation/padding");
  TORCH_CHECK(group >= 1 && value.size(3) % group == 0, "dcnv4: channels must be divisible by group");
  DCNv4Params p;
  p.batch = value.size(0);
  p.height = value.size(1);
  p.width = value.size(2);
  p.channels = value.size(3);
  p.group = static_cast<int>(group);
  p.group_channels = static_cast<int>(p.channels / group);
  p.kernel_h = static_cast<int>(kernel_h);
  p.kernel_w = static_cast<int>(kernel_w);
  p.stride_h = static_cast<int>(stride_h);
  p.stride_w = static_cast<int>(stride_w);
  p.pad_h = static_cast<int>(pad_h);
  p.pad_w = static_cast<int>(pad_w);
  p.dilation_h = static_cast<int>(dilation_h);
  p.dilation_w = static_cast<int>(dilation_w);
  p.remove_center = remove_center;
  p.points = static_cast<int>(kernel_h * kernel_w - (remove_center ? 1 : 0));
  p.offset_scale = offset_scale;
  p.out_height = (p.height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) / stride_h + 1;
  p.out_width = (p.width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) / stride_w + 1;
  TORCH_CHECK(p.points >= 1, "dcnv4: the kernel has no point left");
  TORCH_CHECK(p.out_height >= 1 && p.out_width >= 1, "dcnv4: output size below 1");
  p.om_channels = offset_mask.size(3);
  TORCH_CHECK(offset_mask.size(0) == p.batch && offset_mask.size(1) == p.out_height &&
                  offset_mask.size(2) == p.out_width && p.om_channels >= 3 * group * p.points,
              "dcnv4: offset_mask must be (N, Ho, Wo, >= 3*G*K)");
  return p;
}

}  // namespace mmdcnv4
