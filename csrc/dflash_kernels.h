// Plain C++ interface of the compiled kernels, for engines that embed C++ and
// for the bindings: tensor descriptions, parameter structs, the host path of
// each op (memory-safety guards and parameter filling) and the launchers.
// No PyTorch and no CUDA device code.
#pragma once

#include "tensor.h"
#include "verify_chain.h"
#include "write_kv.h"
