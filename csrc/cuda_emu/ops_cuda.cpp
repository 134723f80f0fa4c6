// The op registration of ../cuda/ops_cuda.cpp, built for the CPU emulator (see ../cuda/emu.h).
#include "../cuda/ops_cuda.cpp"
