// Schema of the DCNv4 ops. Kernels: cpu/dcnv4_cpu.cpp and cuda/*.cu; autograd kernel: dcnv4_autograd.cpp;
// fake kernels (for torch.compile): mmdcnv4/ops/dcnv4.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmdcnv4, m) {
  m.def(
      "dcnv4_forward(Tensor value, Tensor offset_mask, int kernel_h, int kernel_w, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, float offset_scale, "
      "bool remove_center) -> Tensor");
  m.def(
      "dcnv4_backward(Tensor value, Tensor offset_mask, Tensor grad_output, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "float offset_scale, bool remove_center, bool deterministic) -> (Tensor, Tensor)");
}
