// The fused implicit-GEMM forward of the CUDA backend (fused_gemm.cu), registered beside the
// epilogues in bconv_cell_cuda.cu.
#pragma once

#include "../bconv_cell.h"

namespace ptl_fused {

void fused_fwd_cuda(const GemmArgs& g, const FwdEpilogueArgs& a);
void fused_eval_cuda(const GemmArgs& g, const EvalEpilogueArgs& a);

}  // namespace ptl_fused
