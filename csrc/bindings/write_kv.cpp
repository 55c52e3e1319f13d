// Binding of dflash::write_kv_cuda (and its probe): tensors to the host path
// of write_kv.h, then one kernel launch per layer chunk on the current stream.
// The public op (ops.py) owns the contract; the guards here only keep direct
// callers of torch.ops.dflash.write_kv_cuda in bounds.
#include "../write_kv.h"

#include "common.h"
#include "ops.h"

namespace dflash {
namespace bindings {
namespace {

template <typename Path>
void write_kv_host(DFLASH_WRITE_KV_ARGS) {
  const WriteKVArgs<TensorListDescs> args{
      describe(k),        describe(v),           describe(k_norm_weight),   describe(positions),
      describe(slot_mapping), TensorListDescs{k_caches}, TensorListDescs{v_caches},
      describe(cos_sin_cache), eps, rope_neox, rotary_dim, describe(k_scale), describe(v_scale)};
  // The guard and the stream are taken once, at the first launch (none when
  // the guards fail or there is nothing to write).
  std::optional<Path> path;
  const char* failed = write_kv_launches(args, [&](const WriteKVParams& p) {
    if (!path) path.emplace(k);
    if constexpr (Path::kProbe) {
      check_launch(probe_launch_write_kv(p), "write_kv_cuda");
    } else {
      check_launch(launch_write_kv(p, path->stream), "write_kv_cuda");
    }
  });
  TORCH_CHECK(failed == nullptr, "write_kv_cuda: ", failed);
}

}  // namespace

void write_kv_cuda(DFLASH_WRITE_KV_ARGS) {
  write_kv_host<Device>(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                        cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale);
}

void probe_write_kv_cuda(DFLASH_WRITE_KV_ARGS) {
  write_kv_host<Probe>(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                       cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale);
}

}  // namespace bindings
}  // namespace dflash
