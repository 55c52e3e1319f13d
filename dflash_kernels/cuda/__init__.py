"""CUDA backend: the ops of the compiled extension ``dflash_kernels._C`` (csrc/).

Importing this package fails with ImportError when the extension was not
built, which the registry reports as "backend unavailable". One module per op
(``verify_chain``, ``write_kv``) defines the backend function named like the op
(the signatures of docs/DESIGN.md, "The backend interface") and
``UNSUPPORTED_ARGS``: the optional arguments that must be None for this
backend to run a call. The registry reads it and picks another backend for
such calls; nothing here routes.
"""

from .. import _C  # noqa: F401  (loading it registers torch.ops.dflash.*_cuda)
