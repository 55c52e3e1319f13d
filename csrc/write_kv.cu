// Entry point of the write_kv kernel (plain pointers; no PyTorch headers).
#include "write_kv.cuh"

namespace dflash {
DFLASH_ENTRY_POINTS(WriteKVParams, writekv::dispatch, launch_write_kv, probe_launch_write_kv)
}  // namespace dflash
