// Binding of dflash::verify_chain_cuda (and its probe): tensors to the host
// path of verify_chain.h, then the kernels on the current stream. The public
// op (ops.py) owns the contract; the guards here only keep direct callers of
// torch.ops.dflash.verify_chain_cuda in bounds.
#include "../verify_chain.h"

#include "common.h"
#include "ops.h"

namespace dflash {
namespace bindings {
namespace {

template <typename Path>
void verify_chain_host(DFLASH_VERIFY_CHAIN_ARGS) {
  const VerifyChainArgs args{describe(logits),    describe(block_tokens), describe(num_drafts),
                             describe(temperature), describe(top_k),      describe(top_p),
                             describe(seeds),     describe(positions),    describe(draft_probs),
                             describe(seq_lens),  describe(accept_len),   describe(out_tokens),
                             describe(bonus),     describe(new_seq_lens)};
  VerifyChainParams p;
  const char* failed = verify_chain_params(args, Path::sms(logits), p);
  TORCH_CHECK(failed == nullptr, "verify_chain_cuda: ", failed);
  if (p.batch == 0) return;
  const Path path(logits);
  const c10::DataPtr workspace = Path::workspace(verify_chain_workspace_bytes(p));
  set_verify_chain_workspace(p, workspace.get());
  if constexpr (Path::kProbe) {
    check_launch(probe_launch_verify_chain(p), "verify_chain_cuda");
  } else {
    check_launch(launch_verify_chain(p, path.stream), "verify_chain_cuda");
  }
}

}  // namespace

void verify_chain_cuda(DFLASH_VERIFY_CHAIN_ARGS) {
  verify_chain_host<Device>(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                            positions, draft_probs, seq_lens, accept_len, out_tokens, bonus,
                            new_seq_lens);
}

void probe_verify_chain_cuda(DFLASH_VERIFY_CHAIN_ARGS) {
  verify_chain_host<Probe>(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                           positions, draft_probs, seq_lens, accept_len, out_tokens, bonus,
                           new_seq_lens);
}

}  // namespace bindings
}  // namespace dflash
