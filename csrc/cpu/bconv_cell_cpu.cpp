// CPU epilogues of the BConv-Cell: one parallel pass each for forward and backward over the
// row loops of cell_rows.h, in their AVX2 build where the CPU has it.
// Math: csrc/cell_math.h; reference: python_ref/bconv_cell.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "../bconv_cell.h"
#include "cell_rows.h"

namespace ptl_fused {
namespace {

// The widest build of the row loops this CPU runs, lowered like ATen's own kernels by
// ATEN_CPU_CAPABILITY=default|avx2 so that a user's setting holds here too.
struct RowKernels {
  cpu::FwdRowsFn fwd;
  cpu::BwdRowsFn bwd;
  cpu::EvalRowsFn eval;
};

RowKernels row_kernels() {
  static const RowKernels k = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = env ? env : "";
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (avx512 && cap != "default" && cap != "avx2") {
      return RowKernels{cpu::AVX512::fwd_rows, cpu::AVX512::bwd_rows, cpu::AVX512::eval_rows};
    }
    if (avx2 && cap != "default") {
      return RowKernels{cpu::AVX2::fwd_rows, cpu::AVX2::bwd_rows, cpu::AVX2::eval_rows};
    }
#endif
    return RowKernels{cpu::DEFAULT::fwd_rows, cpu::DEFAULT::bwd_rows, cpu::DEFAULT::eval_rows};
  }();
  return k;
}

// `state` is any (B, C, Ho, Wo) tensor of the cell's state shape (y in eval).
cpu::RowGeometry geometry(const Tensor& state, bool cl, int64_t gates = 4) {
  const int64_t c = state.size(1), s = state.size(2) * state.size(3);
  return {c, cl ? c : s, cl ? c : c * s, gates, cl};
}

template <typename Args, typename Fn>
void run_rows(const Tensor& state, c10::ScalarType dtype, const Args& args, Fn fn) {
  const int64_t inner = std::max<int64_t>(args.geo.inner, 1);
  const int64_t rows = state.numel() / inner;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / inner);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { fn(dtype, args, r0, r1); });
}

void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

double alpha_of(const Tensor& h_alpha) { return h_alpha.defined() ? h_alpha.item<double>() : 0.0; }

void fwd_epilogue_cpu(const FwdEpilogueArgs& a) {
  cpu::FwdRowsArgs r{geometry(a.c_prev, a.channels_last),
                     ptr(a.z),
                     ptr(a.y),
                     ptr(a.c_prev),
                     ptr(a.c_new),
                     ptr(a.h_prev),
                     ptr(a.h_new),
                     a.h_prev.defined() ? alpha_of(a.h_alpha) : 0.0,
                     a.save_gates};
  run_rows(a.c_prev, a.z.scalar_type(), r, row_kernels().fwd);
}

void bwd_epilogue_cpu(const BwdEpilogueArgs& a) {
  cpu::BwdRowsArgs r{geometry(a.c_prev, a.channels_last),
                     ptr(a.gates),
                     ptr(a.c_prev),
                     ptr(a.grad_y),
                     ptr(a.grad_c_new),
                     ptr(a.grad_h_new),
                     ptr(a.grad_z),
                     ptr(a.grad_c_prev),
                     ptr(a.grad_h_prev),
                     alpha_of(a.h_alpha)};
  run_rows(a.c_prev, a.gates.scalar_type(), r, row_kernels().bwd);
}

void eval_epilogue_cpu(const EvalEpilogueArgs& a) {
  const auto geo = geometry(a.y, a.channels_last, 3);
  cpu::EvalRowsArgs r{geo, ptr(a.z), ptr(a.gate_map), ptr(a.y), a.z[0].numel()};
  run_rows(a.y, a.z.scalar_type(), r, row_kernels().eval);
}

}  // namespace

namespace cpu {
void unsupported_dtype(c10::ScalarType dtype) {
  TORCH_CHECK(false, "ptl_fused: unsupported dtype ", dtype);
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(ptl_fused, CPU, m) {
  register_bconv_kernels<fwd_epilogue_cpu, bwd_epilogue_cpu, eval_epilogue_cpu>(m);
}

}  // namespace ptl_fused
