"""CUDA backend: the kernels of csrc/, from the compiled extension
``dflash_kernels._C`` or, when it was not built, compiled at first use by NVRTC.

``IMPL`` says which: ``"extension"`` (``torch.ops.dflash.*_cuda``) or
``"nvrtc"`` (``_jit.py``: NVRTC through ``cuda.bindings``, cubins cached on
disk, launched through the driver API; docs/cuda.md, "No-build path
(NVRTC)"). The NVRTC path is taken when ``_C`` does not import, or always
when ``DFLASH_KERNELS_CUDA_JIT=1``, and only when a CUDA device is present and
cuda.bindings, NVRTC and the CUDA headers are installed. Importing this
package fails with ImportError when neither can run, which the registry
reports as "backend unavailable", with the reason. One module per op
(``verify_chain``, ``write_kv``) defines the backend function named like the op
(the signatures of docs/DESIGN.md, "The backend interface") and
``UNSUPPORTED_ARGS``: the optional arguments that must be None for this
backend to run a call. The registry reads it and picks another backend for
such calls; nothing here routes.
"""

import os

JIT_ENV = "DFLASH_KERNELS_CUDA_JIT"


def _select() -> str:
    from . import _jit

    if (os.environ.get(JIT_ENV) or "0") != "0":
        reason = _jit.unavailable_reason()
        if reason:
            raise ImportError(f"{JIT_ENV} is set, but the NVRTC path cannot run: {reason}")
        return "nvrtc"
    try:
        from .. import _C  # noqa: F401  (loading it registers torch.ops.dflash.*_cuda)
    except ImportError as exc:
        reason = _jit.unavailable_reason()
        if reason:
            raise ImportError(f"dflash_kernels._C is not built ({exc}), and the NVRTC path "
                              f"cannot run: {reason}") from exc
        return "nvrtc"
    return "extension"


IMPL = _select()
