// Row loops of the CPU epilogue on raw pointers, compiled once per instruction set:
// cell_rows_default.cpp (portable), cell_rows_avx2.cpp and cell_rows_avx512.cpp (SLEEF exp/tanh
// through at::vec), chosen at run time by bconv_cell_cpu.cpp, as ATen does for its own kernels.
//
// A row is a contiguous run of `inner` state points: NCHW rows are (b, c) over the spatial
// positions, NHWC rows are (b, h, w) over the channels. The gate tensor has the same rows,
// its `gates` gates (4 in training; 3 in eval: i, o, g) `gate_stride` elements apart.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace ptl_fused::cpu {

struct RowGeometry {
  int64_t c, inner, gate_stride, gates;
  bool channels_last;
  int64_t gate_base(int64_t r) const {
    return channels_last ? r * gates * c : ((r / c) * gates * c + r % c) * inner;
  }
};

// Pointers are to the compute dtype (z, y, grad_y, grad_z) or the state dtype (the rest);
// null for the v2-only and optional ones.
struct FwdRowsArgs {
  RowGeometry geo;
  void* z;
  void* y;
  const void* c_prev;
  void* c_new;
  const void* h_prev;
  void* h_new;
  double alpha;
  bool save_gates;  // false: z is left as it is (the activated gates are not kept)
};

struct BwdRowsArgs {
  RowGeometry geo;
  const void* gates;
  const void* c_prev;
  const void* grad_y;
  const void* grad_c_new;
  const void* grad_h_new;
  void* grad_z;
  void* grad_c_prev;
  void* grad_h_prev;
  double alpha;
};

// Eval: z holds 3 gates; gate_map (or null) is one sample's (3C, Ho, Wo) block in z's layout,
// so a row's map offset is its gate offset modulo `sample` (= 3C·Ho·Wo).
struct EvalRowsArgs {
  RowGeometry geo;
  const void* z;
  const void* gate_map;
  void* y;
  int64_t sample;
};

// Raises the unsupported-dtype error; defined in bconv_cell_cpu.cpp so that no file built for
// one instruction set builds a message (its copy of c10's string helpers could be the one linked).
[[noreturn]] void unsupported_dtype(c10::ScalarType dtype);

using FwdRowsFn = void (*)(c10::ScalarType, const FwdRowsArgs&, int64_t, int64_t);
using BwdRowsFn = void (*)(c10::ScalarType, const BwdRowsArgs&, int64_t, int64_t);
using EvalRowsFn = void (*)(c10::ScalarType, const EvalRowsArgs&, int64_t, int64_t);

namespace DEFAULT {
void fwd_rows(c10::ScalarType dtype, const FwdRowsArgs& a, int64_t r0, int64_t r1);
void bwd_rows(c10::ScalarType dtype, const BwdRowsArgs& a, int64_t r0, int64_t r1);
void eval_rows(c10::ScalarType dtype, const EvalRowsArgs& a, int64_t r0, int64_t r1);
}  // namespace DEFAULT
namespace AVX2 {
void fwd_rows(c10::ScalarType dtype, const FwdRowsArgs& a, int64_t r0, int64_t r1);
void bwd_rows(c10::ScalarType dtype, const BwdRowsArgs& a, int64_t r0, int64_t r1);
void eval_rows(c10::ScalarType dtype, const EvalRowsArgs& a, int64_t r0, int64_t r1);
}  // namespace AVX2
namespace AVX512 {
void fwd_rows(c10::ScalarType dtype, const FwdRowsArgs& a, int64_t r0, int64_t r1);
void bwd_rows(c10::ScalarType dtype, const BwdRowsArgs& a, int64_t r0, int64_t r1);
void eval_rows(c10::ScalarType dtype, const EvalRowsArgs& a, int64_t r0, int64_t r1);
}  // namespace AVX512

}  // namespace ptl_fused::cpu
