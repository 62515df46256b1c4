// The portable build of the epilogue row loops (see cell_rows.h).
#define CPU_CAPABILITY DEFAULT
#include "cell_rows_impl.h"
