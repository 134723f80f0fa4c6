// The CUDA kernels of ../cuda/elementwise.cu, built for the CPU emulator (see ../cuda/emu.h).
#include "../cuda/elementwise.cu"
