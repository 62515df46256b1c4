// The BConv-Cell's pointwise math, shared by the CPU and CUDA epilogues (one place for it).
// Reference: python_ref/bconv_cell.py (_gates_and_state) and its autograd.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#ifndef __CUDACC__
#include <ATen/cpu/vec/vec.h>
#endif

namespace ptl_fused {

// The math below is written once for scalars (CPU and CUDA) and, on the CPU, for
// at::vec::Vectorized lanes (SLEEF exp/tanh), which is what makes the CPU epilogue as fast
// as ATen's own pointwise kernels.
template <typename T>
C10_HOST_DEVICE inline T exp_of(T v) {
  return std::exp(v);
}
template <typename T>
C10_HOST_DEVICE inline T tanh_of(T v) {
  return std::tanh(v);
}
#ifndef __CUDACC__
template <typename T>
inline at::vec::Vectorized<T> exp_of(at::vec::Vectorized<T> v) {
  return v.exp();
}
// tanh through exp, 1 - 2 / (1 + e^{2v}): SLEEF's vector tanh costs ~6x its exp here (4M
// floats: 5.3 ms vs 0.85 ms for ATen's sigmoid; expm1 is slower still), and tanh is half of the
// cell's transcendentals. The identity saturates to +-1 without NaN, but its absolute error
// (~1 ulp of 1) is a large relative one near 0 (400% on a y of 3e-6), so there the odd Taylor
// series v (1 - v^2/3 + 2v^4/15 - 17v^6/315) takes over: a relative error of at most about
// 6.5e-7 (float) and 1.1e-14 (double), just past the edge (NumPy emulation and this kernel;
// the old form: 1.2 and 1.8), and -0 stays -0. The Triton kernels use the same two pieces.
template <typename T>
inline at::vec::Vectorized<T> tanh_of(at::vec::Vectorized<T> v) {
  using Vec = at::vec::Vectorized<T>;
  const Vec far = Vec(T(1)) - Vec(T(2)) / (Vec(T(1)) + (v + v).exp());
  const Vec v2 = v * v;
  const Vec p = (v2 * (Vec(T(42)) - Vec(T(17)) * v2) - Vec(T(105))) / Vec(T(315));
  const Vec near = v * (Vec(T(1)) + v2 * p);
  const T edge = sizeof(T) == 4 ? T(0.25) : T(0.02);
  return Vec::blendv(far, near, v.abs() < Vec(edge));
}
#endif

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T v) {
  return T(1) / (T(1) + exp_of(T(0) - v));
}

// Forward at one (b, c, h, w): pre-activations in, activated gates, new state and output out.
template <typename T>
struct CellPoint {
  T i, f, o, g;  // activated gates
  T c;           // C_b = f * C_{b-1} + i * g
  T y;           // o * tanh(C_b)
};

template <typename T>
C10_HOST_DEVICE inline CellPoint<T> cell_forward(T zi, T zf, T zo, T zg, T c_prev) {
  CellPoint<T> p;
  p.i = sigmoid(zi);
  p.f = sigmoid(zf);
  p.o = sigmoid(zo);
  p.g = tanh_of(zg);
  p.c = p.f * c_prev + p.i * p.g;
  p.y = p.o * tanh_of(p.c);
  return p;
}

// Eval at one point from the zero state: C_b = i * g, so the forget gate is never needed.
template <typename T>
C10_HOST_DEVICE inline T cell_eval(T zi, T zo, T zg) {
  return sigmoid(zo) * tanh_of(sigmoid(zi) * tanh_of(zg));
}

// Backward at one point from the saved (activated) gates: dy is the total gradient reaching
// y (v2 adds alpha * dH_b), dc_new the gradient of C_b. C_b is recomputed, not saved.
// has_dy false: no gradient reaches y at all (only C_b is differentiated), so, as in
// autograd, y's path is absent, and a NaN in o or tanh(C_b) stays out of the others (0 * NaN).
template <typename T>
struct CellGrad {
  T dzi, dzf, dzo, dzg;  // gradients of the four pre-activations
  T dc_prev;
};

template <typename T>
C10_HOST_DEVICE inline CellGrad<T> cell_backward(T i, T f, T o, T g, T c_prev, T dy, T dc_new,
                                                 bool has_dy) {
  const T t = tanh_of(f * c_prev + i * g);
  const T dc = has_dy ? dc_new + dy * o * (T(1) - t * t) : dc_new;
  CellGrad<T> d;
  d.dzi = dc * g * i * (T(1) - i);
  d.dzf = dc * c_prev * f * (T(1) - f);
  d.dzo = has_dy ? dy * t * o * (T(1) - o) : T(0);
  d.dzg = dc * i * (T(1) - g * g);
  d.dc_prev = dc * f;
  return d;
}

}  // namespace ptl_fused
