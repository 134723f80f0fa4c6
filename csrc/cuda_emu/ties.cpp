// The CUDA kernels of ../cuda/ties.cu, built for the CPU emulator (see ../cuda/emu.h).
#include "../cuda/ties.cu"
