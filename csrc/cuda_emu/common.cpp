// The CUDA kernels of ../cuda/common.cu, built for the CPU emulator (see ../cuda/emu.h).
#include "../cuda/common.cu"
