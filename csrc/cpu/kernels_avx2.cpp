// The fused CPU kernels built for the AVX2 instruction set (setup.py passes the flags and
// defines CPU_CAPABILITY=AVX2 and CPU_CAPABILITY_AVX2).
#include "kernels.h"
#include "ckpt_kernels.h"
