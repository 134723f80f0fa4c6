// The CUDA kernels of ../cuda/block_scale.cu, built for the CPU emulator (see ../cuda/emu.h).
#include "../cuda/block_scale.cu"
