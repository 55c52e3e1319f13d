"""dflash_kernels microbenchmarks: ``python -m microbench`` (see docs/benchmark.md)."""
