// The CUDA kernel source csrc/cuda/layers.cu compiled as C++ for the CPU
// emulator (common.cuh includes emu/emu.h when the compiler is not nvcc).
#include "cuda/layers.cu"
