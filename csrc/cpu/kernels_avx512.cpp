// The fused CPU kernels built for the AVX512 instruction set (setup.py passes the flags and
// defines CPU_CAPABILITY=AVX512 and CPU_CAPABILITY_AVX512).
#include "kernels.h"
#include "ckpt_kernels.h"
