// The CUDA kernel source csrc/cuda/attention.cu compiled as C++ for the CPU
// emulator (common.cuh includes emu/emu.h when the compiler is not nvcc).
#include "cuda/attention.cu"
