// Every mmkernels operator schema, declared once. Each backend registers its
// kernels with TORCH_LIBRARY_IMPL in its own file; fake (meta) kernels and
// autograd are registered in Python (mmkernels/ops/).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mmkernels, m) {
  // ---- RoIAlign family (csrc/roi_align/) -------------------------------------
  // input (N, C, H, W); rois (K, 5) = (batch_index, x1, y1, x2, y2), input's dtype.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool channels_last) -> Tensor");
  // (K, C): roi_align(...).mean((2, 3)) in one pass.
  m.def(
      "region_features(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_region_features_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "int pooled_height, int pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
      "SymInt width, int sampling_ratio, bool aligned, bool channels_last) -> Tensor");
  // features: L levels (N, C, H_l, W_l); levels (K,) int64 in [0, L); scales (L,).
  m.def(
      "multiscale_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] scales, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_multiscale_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, float[] scales, "
      "SymInt batch_size, SymInt channels, SymInt[] heights, SymInt[] widths, "
      "int sampling_ratio, bool aligned, bool channels_last) -> Tensor[]");

  // ---- token gathers (csrc/token_gather/) -----------------------------------------
  // x (B, N, D); noise (B, N) float; keeps the n_keep lowest-noise tokens.
  m.def(
      "random_masking(Tensor x, Tensor noise, int n_keep) -> "
      "(Tensor x_kept, Tensor mask, Tensor ids_restore, Tensor ids_keep)");
  // x_kept (B, K, D); ids_restore (B, N) int64, a permutation of [0, N) per row;
  // mask_token (D,) or None (zeros).
  m.def("restore_tokens(Tensor x_kept, Tensor ids_restore, Tensor? mask_token) -> Tensor");
  m.def(
      "_restore_tokens_backward(Tensor grad, Tensor ids_restore, int n_keep) -> "
      "(Tensor grad_x_kept, Tensor grad_mask_token)");
  // x (B, N, D); mask (B, N) bool; max_rows < 0: exactly the selected rows.
  m.def("masked_select_rows(Tensor x, Tensor mask, int max_rows) -> (Tensor rows, Tensor index)");
  // out (num_rows, D) zeros, out[index[m]] = src[m] where index[m] >= 0 (distinct).
  m.def("_scatter_rows(Tensor src, Tensor index, SymInt num_rows) -> Tensor");
  // inputs_embeds (B, L, D); image_mask (B, L) bool; image_features (T, D). check_count:
  // raise ValueError unless image_mask selects exactly T positions (one sync on CUDA).
  m.def(
      "scatter_image_features(Tensor inputs_embeds, Tensor image_mask, Tensor image_features, "
      "bool check_count=True) -> Tensor");

  // Contrastive losses, CPU panel passes (csrc/contrastive/contrastive_cpu.cpp); S is one
  // contiguous (k, m) float32/float64 similarity panel, every vector matches its dtype.
  // Running (max, sum of exp(S - max)) statistics of the rows (k,) and columns (m,)
  // absorb the tile.
  m.def(
      "contrastive_lse_panel_(Tensor S, Tensor(a!) row_max, Tensor(b!) row_sum, "
      "Tensor(c!)? col_max, Tensor(d!)? col_sum) -> ()");
  // S <- exp(S - row_shift[:, None]) (+ exp(S - col_shift[None, :])), in place.
  m.def("contrastive_grad_panel_(Tensor(a!) S, Tensor row_shift, Tensor? col_shift) -> ()");
  // returns sum softplus(L + bias) (0-dim, L's dtype); with_grad: L <- w * sigmoid(L + bias).
  m.def("siglip_panel_(Tensor(a!) L, float bias, float grad_weight, bool with_grad) -> Tensor");

  // ---- attention dropout (csrc/attention/dropout_cpu.cpp) ----------------------------
  // Philox4x32-10 uniforms of the dropout stream (mmkernels/reference.py dropout_uniform):
  // (num_streams, len(rows), len(cols)) for streams stream0.., packed query rows `rows`,
  // key columns `cols` (1-D int32/int64); seed and offset are 64-bit words as int64 bit
  // patterns. dropout_keep: uniform >= float32(dropout_p), bool.
  m.def(
      "dropout_uniform(int seed, int offset, int stream0, int num_streams, Tensor rows, "
      "Tensor cols) -> Tensor");
  m.def(
      "dropout_keep(int seed, int offset, int stream0, int num_streams, Tensor rows, "
      "Tensor cols, float dropout_p) -> Tensor");
}

// Importable as a Python module (mmkernels._C); loading it runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
