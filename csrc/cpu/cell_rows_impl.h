// The row loops themselves; included by one .cpp per instruction set, which defines
// CPU_CAPABILITY (the namespace, as in ATen) before any ATen header.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <tuple>
#include <type_traits>

#include "../cell_math.h"
#include "cell_rows.h"

namespace ptl_fused::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
T* cast(void* p) {
  return static_cast<T*>(p);
}
template <typename T>
const T* cast(const void* p) {
  return static_cast<const T*>(p);
}

// A row's vector step: one Vectorized<scalar_t> as kVecs vectors of the accumulation type,
// which the cell math runs on: one for float/double; two floats for bf16/fp16, converted as
// the scalar loop converts each element.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kVecs = std::is_same_v<scalar_t, acc_t> ? 1 : 2;
  static constexpr int64_t kWidth = kVecs * Vec::size();
  static_assert(at::vec::Vectorized<scalar_t>::size() == kWidth);

  static void load(const scalar_t* p, Vec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0] = Vec::loadu(p);
    } else {
      std::tie(v[0], v[1]) =
          at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    }
  }
  static void store(scalar_t* p, const Vec (&v)[kVecs]) {
    if constexpr (kVecs == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
  // The G gate slices of a row from p, gs apart (gate q at p + q * gs).
  template <int G>
  static void load_gates(const scalar_t* p, int64_t gs, Vec (&v)[G][kVecs]) {
    for (int q = 0; q < G; ++q) load(p + q * gs, v[q]);
  }
  template <int G>
  static void store_gates(scalar_t* p, int64_t gs, const Vec (&v)[G][kVecs]) {
    for (int q = 0; q < G; ++q) store(p + q * gs, v[q]);
  }
  // v rounded to scalar_t and back, as the scalar loop's static_cast<scalar_t>.
  static void round(Vec (&v)[kVecs]) {
    if constexpr (kVecs == 2) {
      std::tie(v[0], v[1]) =
          at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v[0], v[1]));
    }
  }
};

template <typename scalar_t>
void fwd_typed(const FwdRowsArgs& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  scalar_t* z = cast<scalar_t>(a.z);
  scalar_t* y = cast<scalar_t>(a.y);
  const acc_t* cp = cast<acc_t>(a.c_prev);
  acc_t* cn = cast<acc_t>(a.c_new);
  const acc_t* hp = cast<acc_t>(a.h_prev);
  acc_t* hn = cast<acc_t>(a.h_new);
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const int64_t n = a.geo.inner, gs = a.geo.gate_stride;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* zr = z + a.geo.gate_base(r);
    const int64_t s = r * n;
    int64_t j = 0;
    for (; j + L::kWidth <= n; j += L::kWidth) {
      Vec zv[4][L::kVecs], yv[L::kVecs];  // i, f, o, g
      L::load_gates(zr + j, gs, zv);
      for (int k = 0; k < L::kVecs; ++k) {
        const int64_t o = s + j + k * Vec::size();
        const auto p =
            cell_forward<Vec>(zv[0][k], zv[1][k], zv[2][k], zv[3][k], Vec::loadu(cp + o));
        zv[0][k] = p.i, zv[1][k] = p.f, zv[2][k] = p.o, zv[3][k] = p.g, yv[k] = p.y;
        p.c.store(cn + o);
      }
      if (a.save_gates) L::store_gates(zr + j, gs, zv);
      L::store(y + s + j, yv);
      if (hp) {
        L::round(yv);  // H aggregates y as stored
        for (int k = 0; k < L::kVecs; ++k) {
          const int64_t o = s + j + k * Vec::size();
          const Vec h = Vec::loadu(hp + o);
          (h + Vec(alpha) * (yv[k] - h)).store(hn + o);
        }
      }
    }
    for (; j < n; ++j) {
      const auto p =
          cell_forward<acc_t>(zr[j], zr[j + gs], zr[j + 2 * gs], zr[j + 3 * gs], cp[s + j]);
      if (a.save_gates) {
        zr[j] = p.i;
        zr[j + gs] = p.f;
        zr[j + 2 * gs] = p.o;
        zr[j + 3 * gs] = p.g;
      }
      cn[s + j] = p.c;
      const scalar_t yv = static_cast<scalar_t>(p.y);
      y[s + j] = yv;
      if (hp) hn[s + j] = hp[s + j] + alpha * (static_cast<acc_t>(yv) - hp[s + j]);
    }
  }
}

template <typename scalar_t>
void bwd_typed(const BwdRowsArgs& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const scalar_t* gates = cast<scalar_t>(a.gates);
  scalar_t* gz = cast<scalar_t>(a.grad_z);
  const acc_t* cp = cast<acc_t>(a.c_prev);
  const scalar_t* gy = cast<scalar_t>(a.grad_y);
  const acc_t* gc = cast<acc_t>(a.grad_c_new);
  const acc_t* gh = cast<acc_t>(a.grad_h_new);
  acc_t* gcp = cast<acc_t>(a.grad_c_prev);
  acc_t* ghp = cast<acc_t>(a.grad_h_prev);
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const bool has_dy = gy || gh;  // does any gradient reach y?
  const int64_t n = a.geo.inner, gs = a.geo.gate_stride;
  const Vec zero(0), va(alpha);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g0 = a.geo.gate_base(r);
    const scalar_t* gr = gates + g0;
    scalar_t* gzr = gz + g0;
    const int64_t s = r * n;
    int64_t j = 0;
    for (; j + L::kWidth <= n; j += L::kWidth) {
      Vec gv[4][L::kVecs], dyv[L::kVecs];  // the gates i, f, o, g; then their dZ
      L::load_gates(gr + j, gs, gv);
      if (gy) {
        L::load(gy + s + j, dyv);
      } else {
        for (auto& v : dyv) v = zero;
      }
      for (int k = 0; k < L::kVecs; ++k) {
        const int64_t o = s + j + k * Vec::size();
        const Vec dh = gh ? Vec::loadu(gh + o) : zero;
        const auto d =
            cell_backward<Vec>(gv[0][k], gv[1][k], gv[2][k], gv[3][k], Vec::loadu(cp + o),
                               dyv[k] + va * dh, gc ? Vec::loadu(gc + o) : zero, has_dy);
        gv[0][k] = d.dzi, gv[1][k] = d.dzf, gv[2][k] = d.dzo, gv[3][k] = d.dzg;
        d.dc_prev.store(gcp + o);
        if (ghp) ((Vec(1) - va) * dh).store(ghp + o);
      }
      L::store_gates(gzr + j, gs, gv);
    }
    for (; j < n; ++j) {
      const acc_t dh = gh ? gh[s + j] : acc_t(0);
      const acc_t dy = (gy ? static_cast<acc_t>(gy[s + j]) : acc_t(0)) + alpha * dh;
      const auto d = cell_backward<acc_t>(gr[j], gr[j + gs], gr[j + 2 * gs], gr[j + 3 * gs],
                                          cp[s + j], dy, gc ? gc[s + j] : acc_t(0), has_dy);
      gzr[j] = d.dzi;
      gzr[j + gs] = d.dzf;
      gzr[j + 2 * gs] = d.dzo;
      gzr[j + 3 * gs] = d.dzg;
      gcp[s + j] = d.dc_prev;
      if (ghp) ghp[s + j] = (acc_t(1) - alpha) * dh;
    }
  }
}

template <typename scalar_t>
void eval_typed(const EvalRowsArgs& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const scalar_t* z = cast<scalar_t>(a.z);
  const scalar_t* map = cast<scalar_t>(a.gate_map);
  scalar_t* y = cast<scalar_t>(a.y);
  const int64_t n = a.geo.inner, gs = a.geo.gate_stride;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g0 = a.geo.gate_base(r);
    const scalar_t* zr = z + g0;
    const scalar_t* mr = map ? map + g0 % a.sample : nullptr;
    scalar_t* yr = y + r * n;
    int64_t j = 0;
    for (; j + L::kWidth <= n; j += L::kWidth) {
      Vec zv[3][L::kVecs], yv[L::kVecs];  // i, o, g
      L::load_gates(zr + j, gs, zv);
      if (mr) {  // added in the compute dtype, as the scalar loop
        Vec mv[3][L::kVecs];
        L::load_gates(mr + j, gs, mv);
        for (int q = 0; q < 3; ++q) {
          for (int k = 0; k < L::kVecs; ++k) zv[q][k] += mv[q][k];
          L::round(zv[q]);
        }
      }
      for (int k = 0; k < L::kVecs; ++k) yv[k] = cell_eval<Vec>(zv[0][k], zv[1][k], zv[2][k]);
      L::store(yr + j, yv);
    }
    for (; j < n; ++j) {
      // The map is added in the compute dtype, as the reference adds it to the conv output.
      auto pre = [&](int64_t q) {
        const scalar_t v =
            mr ? static_cast<scalar_t>(zr[j + q * gs] + mr[j + q * gs]) : zr[j + q * gs];
        return static_cast<acc_t>(v);
      };
      yr[j] = static_cast<scalar_t>(cell_eval<acc_t>(pre(0), pre(1), pre(2)));
    }
  }
}

}  // namespace

namespace {

// Calls fn(T{}) for the compute dtype T of `dtype`: one switch for every row loop.
template <typename Fn>
void by_dtype(c10::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case c10::kFloat:
      return fn(float{});
    case c10::kDouble:
      return fn(double{});
    case c10::kBFloat16:
      return fn(c10::BFloat16{});
    case c10::kHalf:
      return fn(c10::Half{});
    default:
      unsupported_dtype(dtype);
  }
}

}  // namespace

void fwd_rows(c10::ScalarType dtype, const FwdRowsArgs& a, int64_t r0, int64_t r1) {
  by_dtype(dtype, [&](auto t) { fwd_typed<decltype(t)>(a, r0, r1); });
}

void bwd_rows(c10::ScalarType dtype, const BwdRowsArgs& a, int64_t r0, int64_t r1) {
  by_dtype(dtype, [&](auto t) { bwd_typed<decltype(t)>(a, r0, r1); });
}

void eval_rows(c10::ScalarType dtype, const EvalRowsArgs& a, int64_t r0, int64_t r1) {
  by_dtype(dtype, [&](auto t) { eval_typed<decltype(t)>(a, r0, r1); });
}

}  // namespace ptl_fused::cpu::CPU_CAPABILITY
