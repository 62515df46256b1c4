// The BConv-Cell ops (schemas in bconv_cell.cpp): device-generic bodies around per-device
// fused epilogues. A backend (csrc/cpu, csrc/cuda) supplies the two epilogues and registers
// the bodies for its dispatch key with register_bconv_kernels<>.
//
//   forward : Z = conv(x [, X~]) through ATen; ONE epilogue pass -> y, C_b (, H_b); where a
//             backward keeps them (save_gates), Z is overwritten with the activated gates,
//             the only (B, 4C, Ho, Wo) tensor saved.
//   backward: ONE epilogue pass -> dZ, dC_{b-1} (, dH_{b-1} aggregation part); the
//             convolution backward is ATen's, called from Python (ptl_fused/_cpp_ops.py).
//   eval    : the zero-state shortcut (DESIGN.md §5, python_ref/eval_path.py): Z = conv(x)
//             over the i, o, g rows only (+ v2's precomputed gate map); ONE epilogue -> y.
// fused_gemm=True (forward and eval; CUDA only, csrc/cuda/fused_gemm.cu) replaces the ATen
// convolution + epilogue with ONE implicit-GEMM kernel whose epilogue is the cell: Z never
// reaches memory; the activated gates are written directly, where they are saved.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace ptl_fused {

using at::Tensor;

// Every tensor below is (B, C or 4C, Ho, Wo) in one layout: NCHW, or NHWC when channels_last.
// The v2 fields (h_*) are undefined for v1. h_alpha is a 1-element tensor of the state dtype
// on the tensors' device, so a kernel reads it without a host sync.
struct FwdEpilogueArgs {
  Tensor z;  // in: pre-activations; out (save_gates): activated gates (compute dtype)
  Tensor c_prev, h_prev, h_alpha;
  Tensor y, c_new, h_new;  // outputs
  bool channels_last;
  // false: nobody keeps the gates (no backward, or one that recomputes them), so the
  // epilogue leaves z as it is and the fused kernel gets no z (undefined) to write them to.
  bool save_gates = true;
};

struct BwdEpilogueArgs {
  Tensor grad_y, grad_c_new, grad_h_new;  // any may be undefined (= zero gradient)
  Tensor c_prev, gates, h_alpha;
  Tensor grad_z, grad_c_prev, grad_h_prev;  // outputs
  bool channels_last;
};

// Eval: z is (B, 3C, Ho, Wo), gates i, o, g; gate_map (undefined, or (3C, Ho, Wo) in z's
// layout without the batch) is added to z; y is (B, C, Ho, Wo).
struct EvalEpilogueArgs {
  Tensor z, gate_map, y;
  bool channels_last;
};

// The convolution of the fused implicit-GEMM forward: Z = conv(x, weight[:, :Cin]) (+ for
// v2 conv(x_rec, weight[:, Cin:]), the concatenation never built) + bias. The epilogue args
// then name the outputs: FwdEpilogueArgs.z receives the activated gates (not read; undefined
// when they are not saved); EvalEpilogueArgs.z is unused.
struct GemmArgs {
  Tensor x, x_rec, weight, bias;  // x_rec, bias: undefined when absent
  int64_t stride, padding;
};

using FwdEpilogue = void (*)(const FwdEpilogueArgs&);
using BwdEpilogue = void (*)(const BwdEpilogueArgs&);
using EvalEpilogue = void (*)(const EvalEpilogueArgs&);
using FusedFwd = void (*)(const GemmArgs&, const FwdEpilogueArgs&);
using FusedEval = void (*)(const GemmArgs&, const EvalEpilogueArgs&);

using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> bconv_cell_fwd(FwdEpilogue epilogue, FusedFwd fused,
                                                  const Tensor& x, const Tensor& weight,
                                                  const OptTensor& bias, const Tensor& c_prev,
                                                  int64_t stride, int64_t padding, bool fused_gemm,
                                                  bool save_gates);

std::tuple<Tensor, Tensor> bconv_cell_bwd(BwdEpilogue epilogue, const OptTensor& grad_y,
                                          const OptTensor& grad_c_new, const Tensor& c_prev,
                                          const Tensor& gates);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bconv_cell_v2_fwd(
    FwdEpilogue epilogue, FusedFwd fused, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const Tensor& weight_rec, const OptTensor& bias_rec,
    const Tensor& c_prev, const Tensor& h_prev, const Tensor& h_alpha, int64_t stride,
    int64_t padding, bool fused_gemm, bool save_gates);

std::tuple<Tensor, Tensor, Tensor> bconv_cell_v2_bwd(BwdEpilogue epilogue, const OptTensor& grad_y,
                                                     const OptTensor& grad_c_new,
                                                     const OptTensor& grad_h_new,
                                                     const Tensor& c_prev, const Tensor& gates,
                                                     const Tensor& h_alpha);

Tensor bconv_cell_eval(EvalEpilogue epilogue, FusedEval fused, const Tensor& x,
                       const Tensor& weight3, const OptTensor& bias3, const OptTensor& gate_map,
                       int64_t stride, int64_t padding, bool fused_gemm);

// Binds a backend's epilogues (and fused forward, where it has one) into the op bodies above,
// for TORCH_LIBRARY_IMPL.
template <FwdEpilogue FE, BwdEpilogue BE, EvalEpilogue EE, FusedFwd FF = nullptr,
          FusedEval FV = nullptr>
struct Kernels {
  static std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& x, const Tensor& w,
                                                const OptTensor& b, const Tensor& c_prev,
                                                int64_t stride, int64_t padding, bool fused_gemm,
                                                bool save_gates) {
    return bconv_cell_fwd(FE, FF, x, w, b, c_prev, stride, padding, fused_gemm, save_gates);
  }
  static std::tuple<Tensor, Tensor> bwd(const OptTensor& gy, const OptTensor& gc,
                                        const Tensor& c_prev, const Tensor& gates) {
    return bconv_cell_bwd(BE, gy, gc, c_prev, gates);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> v2_fwd(
      const Tensor& x, const Tensor& w, const OptTensor& b, const Tensor& w_rec,
      const OptTensor& b_rec, const Tensor& c_prev, const Tensor& h_prev, const Tensor& h_alpha,
      int64_t stride, int64_t padding, bool fused_gemm, bool save_gates) {
    return bconv_cell_v2_fwd(FE, FF, x, w, b, w_rec, b_rec, c_prev, h_prev, h_alpha, stride,
                             padding, fused_gemm, save_gates);
  }
  static std::tuple<Tensor, Tensor, Tensor> v2_bwd(const OptTensor& gy, const OptTensor& gc,
                                                   const OptTensor& gh, const Tensor& c_prev,
                                                   const Tensor& gates, const Tensor& h_alpha) {
    return bconv_cell_v2_bwd(BE, gy, gc, gh, c_prev, gates, h_alpha);
  }
  static Tensor eval(const Tensor& x, const Tensor& w3, const OptTensor& b3,
                     const OptTensor& gate_map, int64_t stride, int64_t padding, bool fused_gemm) {
    return bconv_cell_eval(EE, FV, x, w3, b3, gate_map, stride, padding, fused_gemm);
  }
};

template <FwdEpilogue FE, BwdEpilogue BE, EvalEpilogue EE, FusedFwd FF = nullptr,
          FusedEval FV = nullptr>
void register_bconv_kernels(torch::Library& m) {
  using K = Kernels<FE, BE, EE, FF, FV>;
  m.impl("bconv_cell_fwd", TORCH_FN(K::fwd));
  m.impl("bconv_cell_bwd", TORCH_FN(K::bwd));
  m.impl("bconv_cell_v2_fwd", TORCH_FN(K::v2_fwd));
  m.impl("bconv_cell_v2_bwd", TORCH_FN(K::v2_bwd));
  m.impl("bconv_cell_eval", TORCH_FN(K::eval));
}

}  // namespace ptl_fused
