// The CUDA kernels (csrc/cuda/fused_gemm_kernel.cuh, epilogue_kernels.cuh) compiled for the
// CPU against cuda_emulation.h, with the same host set-up as the CUDA entry points
// (fwd_params / eval_params; run_*_epilogue), exposed to tests/test_cuda_kernels_emulated.py.
// The outputs are allocated by the caller (in guarded buffers, so a write out of bounds is
// seen).

// clang-format off
#include "cuda_emulation.h"  // first: the built-ins the kernel source expects
// clang-format on

#include <torch/extension.h>

#include <algorithm>

#include "cuda/epilogue_kernels.cuh"
#include "cuda/fused_gemm_kernel.cuh"

namespace {

using namespace ptl_fused;
using namespace ptl_fused::fused_gemm;
using OptTensor = std::optional<at::Tensor>;

at::Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// As fused_gemm.cu's launch: the gather order and weight of with_gather_order.
template <typename T, int G, typename MakeParams>
void run(const GemmArgs& g, MakeParams make_params) {
  using Tile = std::conditional_t<kTensorCores<T>, TensorCoreTile<T, G>, ScalarTile<T, G>>;
  with_gather_order<T>(g, make_params, [](auto tap_major, const auto& p) {
    const auto gx = static_cast<unsigned>((p.M + BM - 1) / BM);
    const auto gy = static_cast<unsigned>((p.Cout + BN - 1) / BN);
    const std::string err = cuda_emulation::launch(
        gx, gy, kThreads, [&] { fused_cell_kernel<T, G, Tile, decltype(tap_major)::value>(p); });
    TORCH_CHECK(err.empty(), "emulated fused kernel: ", err);
  });
}

void fwd(const at::Tensor& x, const OptTensor& x_rec, const at::Tensor& weight,
         const OptTensor& bias, const at::Tensor& c_prev, const OptTensor& h_prev,
         const OptTensor& alpha, int64_t stride, int64_t padding, bool channels_last,
         const at::Tensor& y, const at::Tensor& c_new, const OptTensor& h_new,
         const OptTensor& gates) {
  const GemmArgs g{x, value_or_undefined(x_rec), weight, value_or_undefined(bias), stride, padding};
  FwdEpilogueArgs a;
  a.z = value_or_undefined(gates);  // None: the gates are not saved (as run_fwd sets it up)
  a.save_gates = gates.has_value();
  a.c_prev = c_prev;
  a.h_prev = value_or_undefined(h_prev);
  a.h_alpha = value_or_undefined(alpha);
  a.y = y;
  a.c_new = c_new;
  a.h_new = value_or_undefined(h_new);
  a.channels_last = channels_last;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "emulated_fwd", [&] {
    run<scalar_t, 4>(g, [&](const Tensor& w) {
      return fwd_params<scalar_t, at::opmath_type<scalar_t>>(g, w, a);
    });
  });
}

void eval(const at::Tensor& x, const at::Tensor& weight3, const OptTensor& bias3,
          const OptTensor& gate_map, int64_t stride, int64_t padding, bool channels_last,
          const at::Tensor& y) {
  const GemmArgs g{x, at::Tensor(), weight3, value_or_undefined(bias3), stride, padding};
  EvalEpilogueArgs a;
  a.gate_map = value_or_undefined(gate_map);
  a.y = y;
  a.channels_last = channels_last;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "emulated_eval", [&] {
    run<scalar_t, 3>(g, [&](const Tensor& w) {
      return eval_params<scalar_t, at::opmath_type<scalar_t>>(g, w, a);
    });
  });
}

// The A-gather order fused_gemm.cu launches for x (and v2's X~): true = tap-major.
bool tap_major_of(const at::Tensor& x, const OptTensor& x_rec) {
  const GemmArgs g{x, value_or_undefined(x_rec), at::Tensor(), at::Tensor(), 1, 0};
  bool out = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "emulated_order",
                                  [&] { out = tap_major<scalar_t>(g); });
  return out;
}

// The weight as the fused kernel reads it (gemm_weight), for `sources` = 1 (v1) or 2 (v2).
at::Tensor gemm_weight_of(const at::Tensor& weight, int64_t sources, bool tap_major) {
  const at::Tensor second = sources == 2 ? at::empty({0}) : at::Tensor();  // only "defined" is read
  const GemmArgs g{at::Tensor(), second, weight, at::Tensor(), 1, 0};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "emulated_weight",
                                  [&] { out = gemm_weight<scalar_t>(g, tap_major); });
  return out;
}

// The epilogues' launcher: few, small blocks, so every grid-stride loop wraps around.
struct EmulatedLaunch {
  static constexpr int64_t kThreads = 64, kMaxBlocks = 3;
  template <typename... KArgs, typename... Args>
  static void launch(void (*kernel)(KArgs...), int64_t work, Args&&... args) {
    const auto blocks = std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, kMaxBlocks);
    const std::string err = cuda_emulation::launch(static_cast<unsigned>(blocks), 1, kThreads,
                                                   [&] { kernel(args...); });
    TORCH_CHECK(err.empty(), "emulated epilogue kernel: ", err);
  }
};

void epilogue_fwd(const at::Tensor& z, const at::Tensor& c_prev, const OptTensor& h_prev,
                  const OptTensor& h_alpha, const at::Tensor& y, const at::Tensor& c_new,
                  const OptTensor& h_new, bool channels_last, bool save_gates) {
  FwdEpilogueArgs a;
  a.z = z;
  a.c_prev = c_prev;
  a.h_prev = value_or_undefined(h_prev);
  a.h_alpha = value_or_undefined(h_alpha);
  a.y = y;
  a.c_new = c_new;
  a.h_new = value_or_undefined(h_new);
  a.channels_last = channels_last;
  a.save_gates = save_gates;
  epilogue::run_fwd_epilogue<EmulatedLaunch>(a);
}

void epilogue_bwd(const OptTensor& grad_y, const OptTensor& grad_c_new, const OptTensor& grad_h_new,
                  const at::Tensor& c_prev, const at::Tensor& gates, const OptTensor& h_alpha,
                  const at::Tensor& grad_z, const at::Tensor& grad_c_prev,
                  const OptTensor& grad_h_prev, bool channels_last) {
  BwdEpilogueArgs a;
  a.grad_y = value_or_undefined(grad_y);
  a.grad_c_new = value_or_undefined(grad_c_new);
  a.grad_h_new = value_or_undefined(grad_h_new);
  a.c_prev = c_prev;
  a.gates = gates;
  a.h_alpha = value_or_undefined(h_alpha);
  a.grad_z = grad_z;
  a.grad_c_prev = grad_c_prev;
  a.grad_h_prev = value_or_undefined(grad_h_prev);
  a.channels_last = channels_last;
  epilogue::run_bwd_epilogue<EmulatedLaunch>(a);
}

void epilogue_eval(const at::Tensor& z, const OptTensor& gate_map, const at::Tensor& y,
                   bool channels_last) {
  EvalEpilogueArgs a;
  a.z = z;
  a.gate_map = value_or_undefined(gate_map);
  a.y = y;
  a.channels_last = channels_last;
  epilogue::run_eval_epilogue<EmulatedLaunch>(a);
}

// A WMMA load from a pointer 8 bytes off 32-byte alignment: the stand-in's
// error message (so a test can show its checks are live).
std::string misaligned_wmma_load() {
  alignas(64) static at::BFloat16 tile[16 * 40 + 8];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, at::BFloat16, nvcuda::wmma::row_major>
      f;
  return cuda_emulation::launch(1, 1, 1, [&] { nvcuda::wmma::load_matrix_sync(f, tile + 4, 40); });
}

// Planted faults for the stand-in's other rules, each a kernel a GPU would get wrong.
std::string divergent_barrier() {
  return cuda_emulation::launch(1, 1, 64, [] {
    if (threadIdx.x < 32) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  });
}

std::string divergent_wmma() {
  return cuda_emulation::launch(1, 1, 64, [] {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
    if (threadIdx.x % 32 < 16) nvcuda::wmma::fill_fragment(acc, 0.0f);
  });
}

// What a block reads from shared memory that no thread of it wrote: the previous block wrote
// it, so a plain static would still hold 1.0f.
double unwritten_shared_read() {
  double seen = 0;
  cuda_emulation::launch(2, 1, 1, [&] {
    __shared__ float tile[4];
    PTL_FUSED_SHARED_DECLARED(tile);
    if (blockIdx.x == 0) tile[0] = 1.0f;
    if (blockIdx.x == 1) seen = tile[0];
  });
  return seen;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("divergent_barrier", &divergent_barrier);
  m.def("divergent_wmma", &divergent_wmma);
  m.def("unwritten_shared_read", &unwritten_shared_read);
  m.def("fwd", &fwd);
  m.def("tap_major", &tap_major_of);
  m.def("gemm_weight", &gemm_weight_of);
  m.def("eval", &eval);
  m.def("misaligned_wmma_load", &misaligned_wmma_load);
  m.def("epilogue_fwd", &epilogue_fwd);
  m.def("epilogue_bwd", &epilogue_bwd);
  m.def("epilogue_eval", &epilogue_eval);
}
