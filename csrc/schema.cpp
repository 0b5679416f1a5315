// The routing ops' schema, defined once for every backend (CPU here, CUDA in csrc/cuda/).
// Python adds register_fake and register_autograd in mind_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import mind_kernels._C` loads this shared library, which runs the static
// registrations below; the Python module itself is empty (pytorch/extension-cpp's pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mind_kernels, m) {
  // capsules (B, K, D_out) in E's dtype; coupling w (B, K, L) and preactivation z (B, K, D_out)
  // in the accumulation dtype (float64 for float64 inputs, float32 otherwise). logit_scale s > 0 scales the
  // logit update of the iterations t < r: b_ij += s * (c_j . u_i) (ROUTING.md, "Routing logit scale").
  m.def(
      "routing_forward(Tensor behaviors, Tensor weight, Tensor init_logits, Tensor? mask, "
      "Tensor? interest_mask, int num_iters, bool over_behaviors, float logit_scale=1.0) "
      "-> (Tensor, Tensor, Tensor)");
  // dE (B, L, D_in) in E's dtype and dS (D_out, D_in) in S's dtype, for detach_routing=True.
  m.def(
      "routing_backward(Tensor grad_capsules, Tensor behaviors, Tensor weight, Tensor coupling, "
      "Tensor preactivation) -> (Tensor, Tensor)");
  // Jagged batches (ROUTING.md, "Jagged batches"): values (N, D_in), offsets (B + 1) int64 (offsets[0] = 0,
  // non-decreasing, offsets[B] = N), b0 (K, L_max) or (B, K, L_max) with L_max >= every history's length.
  // capsules (B, K, D_out) in values' dtype; coupling w as (N, K) (row offsets[u] + i: behaviour i of user u)
  // and preactivation z (B, K, D_out) in the accumulation dtype.
  m.def(
      "routing_jagged_forward(Tensor values, Tensor offsets, Tensor weight, Tensor init_logits, "
      "Tensor? interest_mask, int num_iters, bool over_behaviors, float logit_scale=1.0) "
      "-> (Tensor, Tensor, Tensor)");
  // dvalues (N, D_in) in values' dtype and dS (D_out, D_in) in S's dtype, for detach_routing=True;
  // max_len is the forward's L_max (>= every history's length: it sizes the kernels' per-user scratch).
  m.def(
      "routing_jagged_backward(Tensor grad_capsules, Tensor values, Tensor offsets, Tensor weight, "
      "Tensor coupling, Tensor preactivation, int max_len) -> (Tensor, Tensor)");
  // Best-interest softmax cross-entropy's element-wise part (mind_kernels/losses.py): scores (B, K, C)
  // = V_b,k . e_n, targets (B,) int64 in [0, num_classes), columns num_classes .. C-1 ignored. Returns the
  // per-user losses (B,) in the accumulation dtype and d(grad_scale * sum of the losses)/d scores
  // (B, K, C) in scores' dtype. CPU only (other devices run the same math in torch ops).
  m.def(
      "best_interest_ce(Tensor scores, Tensor targets, Tensor? interest_mask, int num_classes, "
      "float grad_scale) -> (Tensor, Tensor)");
}

