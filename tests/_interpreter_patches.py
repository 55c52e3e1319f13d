"""Make the Triton interpreter compute bf16 and fp8 casts like a GPU.

bf16: the interpreter stores bf16 as raw uint16 and applies numpy arithmetic
(and ``np.matmul`` for ``tl.dot``) to those integers, which gives wrong
numbers. The patch upcasts bf16 operands to fp32 for dots and for elementwise
arithmetic (rounding elementwise results back to bf16), which is what the GPU
does too. Reductions over bf16 tensors are not patched: kernels reduce fp32
values.

fp8: see :func:`_patch_fp8_cast`.
"""

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as _interp

_B = _interp.InterpreterBuilder


def _to_f32(h):
    if h.dtype.scalar != tl.bfloat16:
        return h
    data = _interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
    return _interp.TensorHandle(data.reshape(h.data.shape), tl.float32)


def _to_bf16(h):
    if h.dtype.scalar != tl.float32:
        return h
    rne = _interp._ir.ROUNDING_MODE.RTNE
    data = _interp._convert_float(h.data, tl.float32, tl.bfloat16, rne).view(np.uint16)
    return _interp.TensorHandle(data.reshape(h.data.shape), tl.bfloat16)


def _patch_fp8_cast():
    """The interpreter rounds fp32 -> fp8 without carrying into the exponent
    (127.9 -> 64 in e4m3) and without ties-to-even; a GPU's cvt.rn does both.
    It also widens e4m3's NaN bytes (0x7F, 0xFF) to +-480 where a GPU's cvt
    gives NaN. Route both directions through torch's conversions."""
    builder = _B
    if getattr(builder, "_dflash_fp8_patched", False):
        return
    to_torch = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    src_np = {tl.float32: np.float32, tl.float16: np.float16}
    # Widened results as the interpreter stores them (bf16 as raw uint16).
    wide = {tl.float32: (torch.float32, np.float32), tl.float16: (torch.float16, np.float16),
            tl.bfloat16: (torch.bfloat16, np.uint16)}
    orig = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst, sty = dst_type.scalar, src.dtype.scalar
        if dst in to_torch and sty in src_np:
            x = torch.from_numpy(np.ascontiguousarray(src.data).view(src_np[sty]).copy())
            data = x.to(to_torch[dst]).view(torch.uint8).numpy().reshape(src.data.shape)
            return _interp.TensorHandle(data, dst)
        if sty in to_torch and dst in wide:
            x = torch.from_numpy(np.ascontiguousarray(src.data).view(np.uint8).copy())
            tdt, ndt = wide[dst]
            y = x.view(to_torch[sty]).to(tdt)
            if tdt == torch.bfloat16:
                y = y.view(torch.int16)
            data = y.numpy().view(ndt).reshape(src.data.shape)
            return _interp.TensorHandle(data, dst)
        return orig(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp
    builder._dflash_fp8_patched = True


def apply():
    _patch_fp8_cast()
    if getattr(_B, "_dflash_bf16_patched", False):
        return
    orig_dot, orig_binary, orig_unary = _B.create_dot, _B.binary_op, _B.unary_op

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, _to_f32(a), _to_f32(b), d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            return _to_bf16(orig_binary(self, _to_f32(lhs), _to_f32(rhs), op))
        return orig_binary(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if arg.dtype.scalar == tl.bfloat16:
            return _to_bf16(orig_unary(self, _to_f32(arg), op))
        return orig_unary(self, arg, op)

    _B.create_dot, _B.binary_op, _B.unary_op = create_dot, binary_op, unary_op
    _B._dflash_bf16_patched = True
