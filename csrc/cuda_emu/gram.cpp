// The CUDA kernels of ../cuda/gram.cu, built for the CPU emulator (see ../cuda/emu.h).
#include "../cuda/gram.cu"
