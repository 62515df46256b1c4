// The AVX-512 build of the epilogue row loops (see cell_rows.h), for CPUs where ATen itself
// runs its pointwise kernels 16 floats wide. Elsewhere than x86-64 it forwards to AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
// The pragma does not define the feature macros that sleef.h and ATen test for.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cell_rows_impl.h"
#else
#include "cell_rows.h"
namespace ptl_fused::cpu::AVX512 {
void fwd_rows(c10::ScalarType d, const FwdRowsArgs& a, int64_t r0, int64_t r1) {
  AVX2::fwd_rows(d, a, r0, r1);
}
void bwd_rows(c10::ScalarType d, const BwdRowsArgs& a, int64_t r0, int64_t r1) {
  AVX2::bwd_rows(d, a, r0, r1);
}
void eval_rows(c10::ScalarType d, const EvalRowsArgs& a, int64_t r0, int64_t r1) {
  AVX2::eval_rows(d, a, r0, r1);
}
}  // namespace ptl_fused::cpu::AVX512
#endif
