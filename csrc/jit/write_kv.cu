// NVRTC entry of the write_kv kernels (dflash_kernels/cuda/_jit.py): the
// kernel template of write_kv.cuh, unchanged; _jit.py instantiates the
// configurations writekv::dispatch launches (nvrtcAddNameExpression) and
// launches them through the driver API with the same grids.
#include "write_kv.cuh"
