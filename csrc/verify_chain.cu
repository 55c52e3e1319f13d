// Entry points of the verify_chain kernels (plain pointers; no PyTorch headers).
#include "verify_chain.cuh"

namespace dflash {
DFLASH_ENTRY_POINTS(VerifyChainParams, verify::dispatch, launch_verify_chain,
                    probe_launch_verify_chain)
}  // namespace dflash
