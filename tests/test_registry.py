"""The backend registry: automatic choice, overrides, and clear errors."""

import pytest
import torch

import dflash_kernels as dk
from dflash_kernels import _registry


def test_reference_is_always_available_on_cpu():
    for op, backends in dk.backends("cpu").items():
        assert "reference" in backends, op


def test_cuda_backend_never_listed_for_cpu_tensors():
    for op, backends in dk.backends("cpu").items():
        assert "cuda" not in backends, op


def test_auto_choice_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    assert _registry.resolve("verify_chain", "cpu") == "reference"


def test_auto_choice_prefers_triton_on_cuda_when_no_extension(monkeypatch):
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    # block_attention has no CUDA implementation: triton is the best on CUDA
    # tensors whenever its module imports.
    if _registry._load("block_attention", "triton")[0] is None:
        pytest.skip("triton attention module not importable")
    assert _registry.resolve("block_attention", "cuda") == "triton"


def test_env_var_overrides(monkeypatch):
    monkeypatch.setenv(_registry.ENV_VAR, "reference")
    assert _registry.resolve("inject_kv", "cuda") == "reference"


def test_argument_overrides_env_var(monkeypatch):
    monkeypatch.setenv(_registry.ENV_VAR, "cuda")
    assert _registry.resolve("inject_kv", "cpu", "reference") == "reference"


def test_unknown_backend_name(monkeypatch):
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="backend: expected one of"):
        _registry.resolve("verify_chain", "cpu", "tpu")
    monkeypatch.setenv(_registry.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=_registry.ENV_VAR):
        _registry.resolve("verify_chain", "cpu")


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        _registry.resolve("softmax", "cpu")


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dk.BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        _registry.resolve("verify_chain", "cpu", "cuda")
    with pytest.raises(dk.BackendUnavailableError, match="triton runs on CUDA tensors"):
        _registry.resolve("verify_chain", "cpu", "triton")
    with pytest.raises(dk.BackendUnavailableError, match="no implementation of block_attention"):
        _registry.resolve("block_attention", "cuda", "cuda")


def test_public_call_with_unavailable_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits = torch.randn(2, 3, 10)
    tokens = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(dk.BackendUnavailableError):
        dk.verify_chain(logits, tokens, backend="cuda")
