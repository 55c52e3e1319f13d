// NVRTC entry of the verify_chain kernels (dflash_kernels/cuda/_jit.py): the
// kernel templates of verify_chain.cuh, unchanged; _jit.py instantiates the
// configurations verify::dispatch launches (nvrtcAddNameExpression) and
// launches them through the driver API with the same grids.
#include "verify_chain.cuh"
