// csrc/cuda/fused_gemm_kernel.cuh compiled for the CPU against
// cuda_emulation.h, with the same parameter set-up as the CUDA entry points
// (fused_fwd_params / eval_params), exposed to
// tests/test_fused_gemm_emulated.py. The outputs are allocated by the caller
// (in guarded buffers, so a write out of bounds is seen).
#include "cuda_emulation.h" // first: the built-ins the kernel source expects

#include <torch/extension.h>

#include "cuda/fused_gemm_kernel.cuh"

namespace {

using namespace ptl_fused;
using namespace ptl_fused::fused_gemm;
using OptTensor = std::optional<at::Tensor>;

at::Tensor value_or_undefined(const OptTensor &t) {
  return t.has_value() ? *t : at::Tensor();
}

template <typename T, int G, typename A> void run(const Params<T, A> &p) {
  using Tile = std::conditional_t<kTensorCores<T>, TensorCoreTile<T, G>,
                                  ScalarTile<T, G>>;
  const auto gx = static_cast<unsigned>((p.M + BM - 1) / BM);
  const auto gy = static_cast<unsigned>((p.Cout + BN - 1) / BN);
  const std::string err = cuda_emulation::launch(
      gx, gy, kThreads, [&] { fused_cell_kernel<T, G, Tile>(p); });
  TORCH_CHECK(err.empty(), "emulated fused kernel: ", err);
}

void fwd(const at::Tensor &x, const OptTensor &x_rec, const at::Tensor &weight,
         const OptTensor &bias, const at::Tensor &c_prev,
         const OptTensor &h_prev, const OptTensor &alpha, int64_t stride,
         int64_t padding, bool channels_last, const at::Tensor &y,
         const at::Tensor &c_new, const OptTensor &h_new,
         const at::Tensor &gates) {
  const GemmArgs g{x,      value_or_undefined(x_rec),
                   weight, value_or_undefined(bias),
                   stride, padding};
  FwdEpilogueArgs a;
  a.z = gates;
  a.c_prev = c_prev;
  a.h_prev = value_or_undefined(h_prev);
  a.h_alpha = value_or_undefined(alpha);
  a.y = y;
  a.c_new = c_new;
  a.h_new = value_or_undefined(h_new);
  a.channels_last = channels_last;
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "emulated_fwd", [&] {
        run<scalar_t, 4>(
            fwd_params<scalar_t, at::opmath_type<scalar_t>>(g, w, a));
      });
}

void eval(const at::Tensor &x, const at::Tensor &weight3,
          const OptTensor &bias3, const OptTensor &gate_map, int64_t stride,
          int64_t padding, bool channels_last, const at::Tensor &y) {
  const GemmArgs g{x,      at::Tensor(), weight3, value_or_undefined(bias3),
                   stride, padding};
  EvalEpilogueArgs a;
  a.gate_map = value_or_undefined(gate_map);
  a.y = y;
  a.channels_last = channels_last;
  const at::Tensor w = weight3.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "emulated_eval", [&] {
        run<scalar_t, 3>(
            eval_params<scalar_t, at::opmath_type<scalar_t>>(g, w, a));
      });
}

// A WMMA load from a pointer 8 bytes off 32-byte alignment: the stand-in's
// error message (so a test can show its checks are live).
std::string misaligned_wmma_load() {
  alignas(64) static at::BFloat16 tile[16 * 40 + 8];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, at::BFloat16,
                         nvcuda::wmma::row_major>
      f;
  return cuda_emulation::launch(
      1, 1, 1, [&] { nvcuda::wmma::load_matrix_sync(f, tile + 4, 40); });
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("eval", &eval);
  m.def("misaligned_wmma_load", &misaligned_wmma_load);
}
