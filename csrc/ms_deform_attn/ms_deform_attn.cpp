// Schema of the multi-scale deformable attention ops (Deformable-DETR's MSDA), in two layouts:
//  - ms_deform_attn_*: mmcv's layout, separate sampling_locations (N, Len_q, heads, L, P, 2) and
//    attention_weights (N, Len_q, heads, L, P), used as given;
//  - flash_deform_attn_*: the packed layout sampling_loc_attn (N, Len_q, heads, 3*L*P), the 2*L*P
//    locations then the L*P logits of each head, with the softmax over all L*P points done in the op.
// Kernels: cpu/ms_deform_attn_cpu.cpp and cuda/*.cu; autograd kernels: ms_deform_attn_autograd.cpp; fake
// kernels (for torch.compile): mmdcnv4/ops/ms_deform_attn.py. The math is in shared/spec/dcnv4-op.md section 2.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmdcnv4, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, bool deterministic) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "flash_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_loc_attn, int num_points) -> Tensor");
  m.def(
      "flash_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_loc_attn, Tensor grad_output, int num_points, bool deterministic) -> (Tensor, Tensor)");
}
