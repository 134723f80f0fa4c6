// The fused CPU kernels built for the DEFAULT instruction set (setup.py passes the flags and
// defines CPU_CAPABILITY=DEFAULT and CPU_CAPABILITY_DEFAULT).
#include "kernels.h"
#include "ckpt_kernels.h"
