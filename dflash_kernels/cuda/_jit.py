"""The no-build cuda path: the kernels of ``csrc/`` compiled by NVRTC (``_nvrtc.py``)
and launched through the CUDA driver API (``cuda.bindings.driver``).

Used by the cuda backend when ``dflash_kernels._C`` was not built (or when
``DFLASH_KERNELS_CUDA_JIT=1`` forces it; see ``dflash_kernels/cuda/__init__.py``).

The host side is a port of the extension's: ``verify_chain_params`` /
``verify_dispatch`` follow ``verify_chain_params`` and ``verify::dispatch``
(csrc/verify_chain.h, .cuh), ``write_kv_launches`` / ``write_kv_dispatch``
follow ``write_kv_launches`` and ``writekv::dispatch`` (csrc/write_kv.h, .cuh):
the same parameter blocks (``ctypes`` structures with the C++ layout), the same
kernel instantiations, grids, block sizes and dynamic shared memory.
tests/test_cuda_nvrtc.py checks both against the C++ host path byte for byte.
As the Triton backend, this path checks what picks a kernel and trusts the
public op (ops.py) for the rest of the contract.

Launches: on torch's current stream of the tensors' device, in the device's
primary context (torch's), one ``cuLaunchKernel`` per kernel with the params
block as the kernel's one argument. The verify_chain workspace comes from
torch's caching allocator, as in the extension.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Dict, List, NamedTuple, Optional

import torch

from . import _nvrtc

# csrc/tensor.h, enum class DType : int32_t.
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3,
         torch.float8_e5m2: 4, torch.int32: 5, torch.int64: 6}
K_FLOAT32, K_FLOAT16, K_BFLOAT16, K_E4M3, K_E5M2, K_INT32, K_INT64 = range(7)
_DTYPE_SIZE = {0: 4, 1: 2, 2: 2, 3: 1, 4: 1, 5: 4, 6: 8}

INT32_MAX = 2**31 - 1
_ptr = ctypes.c_uint64  # void* / T* (LP64, the layout nvcc and NVRTC give the kernels)


class VerifyChainParams(ctypes.Structure):
    """csrc/verify_chain.h, ``struct VerifyChainParams`` (same members, same order)."""

    _fields_ = [
        ("logits", _ptr), ("logits_dtype", ctypes.c_int32),
        ("logits_stride_b", ctypes.c_int64), ("logits_stride_s", ctypes.c_int64),
        ("block_tokens", _ptr), ("block_tokens_int64", ctypes.c_bool),
        ("tokens_stride_b", ctypes.c_int64), ("tokens_stride_s", ctypes.c_int64),
        ("num_drafts", _ptr), ("temperature", _ptr), ("seeds", _ptr), ("positions", _ptr),
        ("seq_lens", _ptr), ("accept_len", _ptr), ("out_tokens", _ptr), ("bonus", _ptr),
        ("new_seq_lens", _ptr), ("workspace_score", _ptr), ("workspace_index", _ptr),
        ("batch", ctypes.c_int32), ("block_size", ctypes.c_int32), ("vocab", ctypes.c_int32),
        ("num_splits", ctypes.c_int32), ("split_len", ctypes.c_int32),
        ("vectorized", ctypes.c_bool),
    ]


MAX_LAYER_PTRS = 32  # csrc/write_kv.h, kWriteKVMaxLayerPtrs


class WriteKVParams(ctypes.Structure):
    """csrc/write_kv.h, ``struct WriteKVParams`` (same members, same order)."""

    _fields_ = [
        ("k", _ptr), ("v", _ptr), ("act_dtype", ctypes.c_int32),
        ("k_stride_n", ctypes.c_int64), ("k_stride_l", ctypes.c_int64),
        ("k_stride_h", ctypes.c_int64),
        ("v_stride_n", ctypes.c_int64), ("v_stride_l", ctypes.c_int64),
        ("v_stride_h", ctypes.c_int64),
        ("k_norm_weight", _ptr), ("norm_dtype", ctypes.c_int32),
        ("norm_stride_l", ctypes.c_int64), ("norm_stride_d", ctypes.c_int64),
        ("positions", _ptr), ("slot_mapping", _ptr), ("cos_sin", _ptr),
        ("cos_sin_stride", ctypes.c_int64), ("max_position", ctypes.c_int64),
        ("k_cache_base", _ptr * MAX_LAYER_PTRS), ("v_cache_base", _ptr * MAX_LAYER_PTRS),
        ("k_uniform", ctypes.c_bool), ("v_uniform", ctypes.c_bool),
        ("k_layer_stride", ctypes.c_int64), ("v_layer_stride", ctypes.c_int64),
        ("cache_dtype", ctypes.c_int32),
        ("k_stride_page", ctypes.c_int64), ("k_stride_row", ctypes.c_int64),
        ("k_stride_head", ctypes.c_int64),
        ("v_stride_page", ctypes.c_int64), ("v_stride_row", ctypes.c_int64),
        ("v_stride_head", ctypes.c_int64),
        ("num_pages", ctypes.c_int64), ("page_size", ctypes.c_int64),
        ("k_scale", _ptr), ("v_scale", _ptr),
        ("num_tokens", ctypes.c_int32), ("num_layers", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("rotary_dim", ctypes.c_int32), ("eps", ctypes.c_float), ("rope_neox", ctypes.c_bool),
        ("vectorized", ctypes.c_bool),
    ]


class Launch(NamedTuple):
    """One kernel launch: ``kernel`` is the name expression of ``_nvrtc.KERNELS[op]``."""

    op: str
    kernel: str
    grid: int
    threads: int
    smem: int
    params: ctypes.Structure


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def _dtype(t) -> int:
    return DTYPE.get(t.dtype, -1)


def _data(t) -> int:
    return 0 if t is None else t.data_ptr()


# ---------------------------------------------------------------- verify_chain


def plan_splits(rows: int, vocab: int, elem_bytes: int, num_sms: int):
    """csrc/verify_chain.h, ``verify::plan_splits``: (split_len, num_splits)."""
    min_split_len = 4096
    rows = max(rows, 1)
    want = _ceil_div(4 * max(num_sms, 1), rows)
    most = max(vocab // min_split_len, 1)
    splits = 1 if want < 1 else min(want, most)
    vec = 16 // elem_bytes
    length = _ceil_div(_ceil_div(vocab, splits), vec) * vec
    return length, max(_ceil_div(vocab, length), 1)


_KERNEL_ERROR = RuntimeError  # what the extension's TORCH_CHECKs raise


def verify_chain_params(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                        positions, draft_probs, seq_lens, accept_len, out_tokens, bonus,
                        new_seq_lens, num_sms: int) -> VerifyChainParams:
    """The params of ``verify_chain_params`` (csrc/verify_chain.h), all but the workspace."""
    if top_k is not None or top_p is not None or draft_probs is not None:
        raise _KERNEL_ERROR("verify_chain_cuda: top_k, top_p, draft_probs: not implemented by "
                            "the compiled kernels (pass None)")
    if block_tokens.dim() != 2 or block_tokens.dtype not in (torch.int32, torch.int64):
        raise _KERNEL_ERROR("verify_chain_cuda: block_tokens: expected int32 or int64 [B, S]")
    if logits.dim() != 3 or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _KERNEL_ERROR("verify_chain_cuda: logits: expected fp32, fp16 or bf16 [B, S, V]")
    B, S = block_tokens.shape
    V = logits.shape[2]
    sampled = temperature is not None
    p = VerifyChainParams()
    p.logits = logits.data_ptr()
    p.logits_dtype = _dtype(logits)
    p.logits_stride_b, p.logits_stride_s = logits.stride(0), logits.stride(1)
    p.block_tokens = block_tokens.data_ptr()
    p.block_tokens_int64 = block_tokens.dtype == torch.int64
    p.tokens_stride_b, p.tokens_stride_s = block_tokens.stride()
    p.num_drafts = num_drafts.data_ptr()
    p.temperature = _data(temperature) if sampled else 0
    p.seeds = _data(seeds) if sampled else 0
    p.positions = _data(positions) if sampled else 0
    p.seq_lens = _data(seq_lens)
    p.accept_len = accept_len.data_ptr()
    p.out_tokens = out_tokens.data_ptr()
    p.bonus = bonus.data_ptr()
    p.new_seq_lens = _data(new_seq_lens)
    p.batch, p.block_size, p.vocab = B, S, V
    esize = _DTYPE_SIZE[p.logits_dtype]
    # verify_chain_vectorizable: base pointer and both row strides 16-byte aligned.
    p.vectorized = (p.logits % 16 == 0 and (p.logits_stride_b * esize) % 16 == 0
                    and (p.logits_stride_s * esize) % 16 == 0)
    p.split_len, p.num_splits = plan_splits(B * S, V, esize, num_sms)
    return p


def verify_chain_workspace_bytes(p: VerifyChainParams) -> int:
    return p.batch * p.block_size * p.num_splits * 8  # sizeof(float) + sizeof(int32_t)


def set_verify_chain_workspace(p: VerifyChainParams, workspace: int) -> None:
    p.workspace_score = workspace
    p.workspace_index = workspace + 4 * p.batch * p.block_size * p.num_splits


_SPLIT_ARGMAX = {K_FLOAT32: ("split_argmax", "fp32"), K_FLOAT16: ("split_argmax", "fp16"),
                 K_BFLOAT16: ("split_argmax", "bf16")}


def verify_dispatch(p: VerifyChainParams) -> List[Launch]:
    """csrc/verify_chain.cuh, ``verify::dispatch``: the split argmax over
    ``B * S * num_splits`` blocks of 256 threads, then the acceptance scan, one
    block of 128 threads per request with ``S`` int32 of dynamic shared memory."""
    if p.batch <= 0:
        return []
    if p.block_size <= 0 or p.vocab <= 0 or p.num_splits <= 0 or p.split_len <= 0:
        raise _KERNEL_ERROR("verify_chain_cuda: launch failed: invalid argument")
    blocks = p.batch * p.block_size * p.num_splits
    if blocks > INT32_MAX:
        raise _KERNEL_ERROR("verify_chain_cuda: launch failed: invalid configuration argument")
    if p.logits_dtype not in _SPLIT_ARGMAX:
        raise _KERNEL_ERROR("verify_chain_cuda: launch failed: invalid argument")
    names = _nvrtc.KERNELS["verify_chain"]
    split = Launch("verify_chain", names[_SPLIT_ARGMAX[p.logits_dtype]], blocks, 256, 0, p)
    tok = "int64" if p.block_tokens_int64 else "int32"
    accept = Launch("verify_chain", names[("accept", tok)], p.batch, 128, 4 * p.block_size, p)
    return [split, accept]


# ---------------------------------------------------------------- write_kv


def write_kv_vectorizable(p: WriteKVParams) -> bool:
    """csrc/write_kv.h, ``write_kv_vectorizable``."""
    row_bytes = 8 * _DTYPE_SIZE.get(p.cache_dtype, 0)
    if p.k % 16 or p.v % 16:
        return False
    for s in (p.k_stride_n, p.k_stride_l, p.k_stride_h, p.v_stride_n, p.v_stride_l,
              p.v_stride_h, p.k_stride_page, p.k_stride_row, p.k_stride_head,
              p.v_stride_page, p.v_stride_row, p.v_stride_head):
        if s % 8:
            return False
    for layer in range(min(p.num_layers, MAX_LAYER_PTRS)):
        if (layer == 0 or not p.k_uniform) and p.k_cache_base[layer] % row_bytes:
            return False
        if (layer == 0 or not p.v_uniform) and p.v_cache_base[layer] % row_bytes:
            return False
    if p.k_uniform and p.k_layer_stride % row_bytes:
        return False
    if p.v_uniform and p.v_layer_stride % row_bytes:
        return False
    return True


def write_kv_launches(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                      cos_sin_cache, eps, rope_neox, rotary_dim, k_scale,
                      v_scale) -> List[WriteKVParams]:
    """The params blocks of ``write_kv_launches`` (csrc/write_kv.h), one per launch:
    one for layer caches at a uniform distance, else one per 32 layers."""
    if k.dim() != 4 or k.dtype not in (torch.float16, torch.bfloat16):
        raise _KERNEL_ERROR("write_kv_cuda: k: expected fp16 or bf16 [N, L, Hkv, D]")
    N, L, H, D = k.shape
    if D not in (64, 128, 256):
        raise _KERNEL_ERROR("write_kv_cuda: k: head dim must be 64, 128 or 256")
    if len(k_caches) == 1 and k_caches[0].dim() == 5:
        k_caches = list(k_caches[0].unbind(0))    # a stacked cache (the public op's form)
    if len(v_caches) == 1 and v_caches[0].dim() == 5:
        v_caches = list(v_caches[0].unbind(0))
    if len(k_caches) != L or len(v_caches) != L:
        raise _KERNEL_ERROR("write_kv_cuda: k_caches, v_caches: expected L per-layer caches")
    if N == 0 or L == 0 or H == 0:
        return []
    kc0, vc0 = k_caches[0], v_caches[0]
    fp8 = kc0.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    base_k, base_v = kc0.data_ptr(), vc0.data_ptr()
    k_layer_stride = k_caches[1].data_ptr() - base_k if L > 1 else 0
    v_layer_stride = v_caches[1].data_ptr() - base_v if L > 1 else 0
    k_uniform = all(k_caches[i].data_ptr() - base_k == i * k_layer_stride for i in range(1, L))
    v_uniform = all(v_caches[i].data_ptr() - base_v == i * v_layer_stride for i in range(1, L))

    nw, cs = k_norm_weight, cos_sin_cache
    p = WriteKVParams()
    p.act_dtype = _dtype(k)
    p.k_stride_n, p.k_stride_l, p.k_stride_h = k.stride()[:3]
    p.v_stride_n, p.v_stride_l, p.v_stride_h = v.stride()[:3]
    p.k_stride_page, p.k_stride_row, p.k_stride_head = kc0.stride()[:3]
    p.v_stride_page, p.v_stride_row, p.v_stride_head = vc0.stride()[:3]
    p.norm_dtype = _dtype(nw) if nw is not None else K_FLOAT32
    p.norm_stride_l, p.norm_stride_d = nw.stride()[:2] if nw is not None else (0, 0)
    p.positions, p.slot_mapping = positions.data_ptr(), slot_mapping.data_ptr()
    p.cos_sin = cs.data_ptr()
    p.cos_sin_stride, p.max_position = cs.stride(0), cs.shape[0]
    p.k_uniform, p.v_uniform = k_uniform, v_uniform
    p.k_layer_stride, p.v_layer_stride = k_layer_stride, v_layer_stride
    p.cache_dtype = _dtype(kc0)
    p.num_pages, p.page_size = kc0.shape[0], kc0.shape[1]
    p.k_scale = _data(k_scale) if fp8 else 0
    p.v_scale = _data(v_scale) if fp8 else 0
    p.num_tokens, p.num_kv_heads, p.head_dim, p.rotary_dim = N, H, D, rotary_dim
    p.eps = eps  # static_cast<float>(double): round to nearest, as ctypes
    p.rope_neox = bool(rope_neox)

    act_bytes = _DTYPE_SIZE[p.act_dtype]
    chunk = L if (k_uniform and v_uniform) else MAX_LAYER_PTRS
    out = []
    # One params block reused across the chunks, as the C++ host path: table
    # entries past the last chunk's layers keep the previous chunk's pointers.
    for l0 in range(0, L, chunk):
        nl = min(L - l0, chunk)
        p.k = k.data_ptr() + l0 * k.stride(1) * act_bytes
        p.v = v.data_ptr() + l0 * v.stride(1) * act_bytes
        p.k_norm_weight = (nw.data_ptr() + l0 * nw.stride(0) * _DTYPE_SIZE[_dtype(nw)]
                           if nw is not None else 0)
        p.num_layers = nl
        # Only the table's 32 entries: a uniform chunk may be longer and needs entry 0
        # alone (csrc/write_kv.h writes past the table there; reported, see docs/cuda.md).
        for i in range(min(nl, MAX_LAYER_PTRS)):
            p.k_cache_base[i] = 0 if (k_uniform and i > 0) else k_caches[l0 + i].data_ptr()
            p.v_cache_base[i] = 0 if (v_uniform and i > 0) else v_caches[l0 + i].data_ptr()
        p.vectorized = write_kv_vectorizable(p)
        out.append(WriteKVParams.from_buffer_copy(p))
    return out


_ACT = {K_FLOAT16: "fp16", K_BFLOAT16: "bf16"}
_KIND = {K_E4M3: "e4m3", K_E5M2: "e5m2"}


def write_kv_dispatch(p: WriteKVParams) -> Optional[Launch]:
    """csrc/write_kv.cuh, ``writekv::dispatch``: ``write_kv_kernel<T, D, kind>``
    over ``ceil(N * L * H / (256 / (D / 8)))`` blocks of 256 threads; None: nothing to do."""
    invalid = _KERNEL_ERROR("write_kv_cuda: launch failed: invalid argument")
    if p.num_tokens <= 0 or p.num_layers <= 0 or p.num_kv_heads <= 0:
        return None
    if (not p.k_uniform or not p.v_uniform) and p.num_layers > MAX_LAYER_PTRS:
        raise invalid
    if p.max_position <= 0 or p.page_size <= 0:
        raise invalid
    if p.act_dtype not in _ACT:
        raise invalid
    kind = _KIND.get(p.cache_dtype)
    if kind is None:
        if p.cache_dtype != p.act_dtype:
            raise invalid
        kind = "same"
    if p.head_dim not in (64, 128, 256):
        raise invalid
    items = p.num_tokens * p.num_layers * p.num_kv_heads
    blocks = _ceil_div(items, 256 // (p.head_dim // 8))
    if blocks > INT32_MAX:
        raise _KERNEL_ERROR("write_kv_cuda: launch failed: invalid configuration argument")
    name = _nvrtc.KERNELS["write_kv"][("write_kv", _ACT[p.act_dtype], p.head_dim, kind)]
    return Launch("write_kv", name, blocks, 256, 0, p)


# ---------------------------------------------------------------- driver


def unavailable_reason() -> str:
    """Empty when this path can run here (cuda.bindings' driver module, NVRTC, the
    CUDA headers, csrc/ and a CUDA device), else why not."""
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError as exc:
        return f"cuda.bindings is not importable ({exc}); pip install cuda-bindings"
    reason = _nvrtc.check_available()
    if reason:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return ""


def _driver():
    from cuda.bindings import driver

    return driver


# Replaced by the tests with a recorder (no GPU here); None: cuda.bindings.driver.
driver = None


def _drv():
    return driver if driver is not None else _driver()


def _check(drv, result, what):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        name = ""
        try:
            name = drv.cuGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - the error is what matters
            pass
        raise RuntimeError(f"{what} failed ({name or int(err)})")
    return result[1] if isinstance(result, tuple) and len(result) == 2 else result[1:]


class _Device:
    """One device: its primary context, arch, SM count and loaded kernels."""

    def __init__(self, index: int):
        drv = _drv()
        self.index = index
        self.arch = _nvrtc.arch_of(torch.cuda.get_device_capability(index))
        self.num_sms = torch.cuda.get_device_properties(index).multi_processor_count
        _check(drv, drv.cuInit(0), "cuInit")
        dev = _check(drv, drv.cuDeviceGet(index), "cuDeviceGet")
        # torch's context (the runtime's primary context of the device).
        self.ctx = _check(drv, drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        self.modules: Dict[str, object] = {}
        self.functions: Dict[tuple, object] = {}
        self.lock = threading.Lock()

    def make_current(self, drv):
        """Makes the device's context current; returns the one to restore, or None
        (it was current already), as the extension's device guard."""
        current = _check(drv, drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) == int(self.ctx):
            return None
        _check(drv, drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        return current

    def function(self, drv, op: str, kernel: str):
        fn = self.functions.get((op, kernel))
        if fn is not None:
            return fn
        with self.lock:
            if op not in self.modules:
                compiled = _nvrtc.compile_op(op, self.arch)
                image = ctypes.create_string_buffer(compiled.cubin, len(compiled.cubin))
                module = _check(drv, drv.cuModuleLoadData(ctypes.addressof(image)),
                                f"cuModuleLoadData ({op}, {self.arch})")
                self.modules[op] = (module, compiled.names)
            module, names = self.modules[op]
            fn = _check(drv, drv.cuModuleGetFunction(module, names[kernel].encode()),
                        f"cuModuleGetFunction ({kernel})")
            self.functions[(op, kernel)] = fn
        return fn


_devices: Dict[int, _Device] = {}
_devices_lock = threading.Lock()


def device(index: int) -> _Device:
    dev = _devices.get(index)
    if dev is None:
        with _devices_lock:
            dev = _devices.get(index)
            if dev is None:
                dev = _devices[index] = _Device(index)
    return dev


def _target(t, op: str):
    """(device, current stream handle) of a call on ``t``'s device."""
    if t.device.type != "cuda":
        raise RuntimeError(f"{op}_cuda: expected CUDA tensors, got one on {t.device}")
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return device(index), torch.cuda.current_stream(index).cuda_stream


def launch(launches: List[Launch], dev: _Device, stream: int) -> None:
    """``cuLaunchKernel`` for each launch, on ``stream`` (a CUstream handle)."""
    drv = _drv()
    previous = dev.make_current(drv)
    try:
        for item in launches:
            fn = dev.function(drv, item.op, item.kernel)
            # kernelParams: one pointer per kernel argument; the kernels take the params block.
            args = (ctypes.c_void_p * 1)(ctypes.addressof(item.params))
            _check(drv, drv.cuLaunchKernel(fn, item.grid, 1, 1, item.threads, 1, 1, item.smem,
                                           drv.CUstream(stream), ctypes.addressof(args), 0),
                   f"{item.op}_cuda: launch of {item.kernel}")
    finally:
        if previous is not None:
            _check(drv, drv.cuCtxSetCurrent(previous), "cuCtxSetCurrent")


def verify_chain(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds, positions,
                 draft_probs, seq_lens, accept_len, out_tokens, bonus, new_seq_lens) -> None:
    """dflash::verify_chain_cuda on the NVRTC-compiled kernels (same arguments)."""
    dev, stream = _target(logits, "verify_chain")
    p = verify_chain_params(logits, block_tokens, num_drafts, temperature, top_k, top_p, seeds,
                            positions, draft_probs, seq_lens, accept_len, out_tokens, bonus,
                            new_seq_lens, dev.num_sms)
    if p.batch == 0:
        return
    workspace = torch.empty(verify_chain_workspace_bytes(p), dtype=torch.uint8,
                            device=logits.device)
    set_verify_chain_workspace(p, workspace.data_ptr())
    launch(verify_dispatch(p), dev, stream)


def write_kv(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches, cos_sin_cache,
             eps, rope_neox, rotary_dim, k_scale, v_scale) -> None:
    """dflash::write_kv_cuda on the NVRTC-compiled kernel (same arguments)."""
    dev, stream = _target(k, "write_kv")
    blocks = write_kv_launches(k, v, k_norm_weight, positions, slot_mapping, k_caches, v_caches,
                               cos_sin_cache, eps, rope_neox, rotary_dim, k_scale, v_scale)
    if not blocks:
        return
    launches = [item for item in map(write_kv_dispatch, blocks) if item is not None]
    launch(launches, dev, stream)
