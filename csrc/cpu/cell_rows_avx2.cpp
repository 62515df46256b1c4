// The AVX2+FMA build of the epilogue row loops (see cell_rows.h); only called where the
// CPU reports AVX2 and FMA. Elsewhere than x86-64 it forwards to the portable build.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// The pragma does not define the feature macros that sleef.h and ATen test for.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cell_rows_impl.h"
#else
#include "cell_rows.h"
namespace ptl_fused::cpu::AVX2 {
void fwd_rows(c10::ScalarType d, const FwdRowsArgs& a, int64_t r0, int64_t r1) {
  DEFAULT::fwd_rows(d, a, r0, r1);
}
void bwd_rows(c10::ScalarType d, const BwdRowsArgs& a, int64_t r0, int64_t r1) {
  DEFAULT::bwd_rows(d, a, r0, r1);
}
void eval_rows(c10::ScalarType d, const EvalRowsArgs& a, int64_t r0, int64_t r1) {
  DEFAULT::eval_rows(d, a, r0, r1);
}
}  // namespace ptl_fused::cpu::AVX2
#endif
