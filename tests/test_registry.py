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


# ---------------------------------------------------------------------------
# The schema table is the one contract
# ---------------------------------------------------------------------------

from dflash_kernels import _schema, ops  # noqa: E402


@pytest.mark.parametrize("op", _registry.OPS)
def test_custom_op_is_generated_from_the_table(op):
    schema = str(getattr(torch.ops.dflash, op).default._schema)
    assert schema == f"dflash::{op}({_schema.SCHEMAS[op]}, str backend) -> ()"
    parsed = _schema.OPS[op]
    assert parsed.mutated, "every op writes at least one output"
    for name in parsed.mutated:
        assert f"!) {name}" in schema or f"!)? {name}" in schema or f"!)[] {name}" in schema


@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("op", _registry.OPS)
def test_backend_functions_take_the_schema_arguments(op, backend):
    import inspect

    fn, _, reason = _registry._load(op, backend)
    if fn is None:
        assert "no implementation" in reason or "could not be imported" in reason
        pytest.skip(reason)
    # Keyword-only extras (test and tuning knobs) may follow the schema's.
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert params == list(_schema.OPS[op].args), f"{backend}.{op}: {params}"


def test_schema_parser_names_optionals_and_outputs():
    p = _schema.parse("x", "Tensor a, Tensor? b, float c, Tensor(a!) d, Tensor(b!)? e, Tensor(c!)[] f")
    assert p.args == ("a", "b", "c", "d", "e", "f")
    assert p.optional == ((1, "b"),)
    assert p.mutated == ("d", "e", "f")
    with pytest.raises(ValueError, match="cannot parse"):
        _schema.parse("x", "Tensor a b")


# ---------------------------------------------------------------------------
# Capability checks: the registry names the backend that really runs a call
# ---------------------------------------------------------------------------

@pytest.fixture
def fake_cuda_backend(monkeypatch):
    """Every backend runs on every device; cuda's verify_chain refuses the
    filters, as the compiled kernel does."""
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    real_load = _registry._load
    calls = []

    def load(op, backend):
        if backend == "cuda" and op == "verify_chain":
            return (lambda *a: calls.append("cuda"),
                    frozenset({"top_k", "top_p", "draft_probs"}), "")
        return real_load(op, backend)

    monkeypatch.setattr(_registry, "_load", load)
    monkeypatch.setattr(_registry, "_device_reason", lambda b, d, i: "")
    _registry._resolve.cache_clear()
    yield calls
    _registry._resolve.cache_clear()


def test_resolve_skips_a_backend_that_cannot_take_an_argument(fake_cuda_backend):
    assert _registry.resolve("verify_chain", "cuda", given=("temperature",)) == "cuda"
    assert _registry.resolve("verify_chain", "cuda", given=("temperature", "top_k")) == "triton"
    assert not _registry.is_available("verify_chain", "cuda", "cuda", ("draft_probs",))
    assert _registry.unsupported_args("verify_chain", "cuda") == {"top_k", "top_p", "draft_probs"}
    with pytest.raises(dk.BackendUnavailableError, match="does not take top_p"):
        _registry.resolve("verify_chain", "cuda", "cuda", given=("temperature", "top_p"))


def _spy_on_given(monkeypatch):
    """``{op: the given optionals the registry resolved the last call with}``."""
    seen = {}

    def spy_resolve(op, device_type, backend, given):
        seen[op] = given
        return "reference"

    # Eager calls ask the registry; traced ones the constant-folded ops._resolve.
    monkeypatch.setattr(_registry, "_resolve", lambda op, dt, req, env, given, interp:
                        spy_resolve(op, dt, req, given))
    monkeypatch.setattr(ops, "_resolve", spy_resolve)
    return seen


def test_public_call_passes_the_given_optionals(monkeypatch):
    seen = _spy_on_given(monkeypatch)
    monkeypatch.setattr(_registry, "_given_matters", lambda op, device_type, interp: True)
    B, S, V = 2, 3, 11
    logits = torch.randn(B, S, V)
    tokens = torch.zeros(B, S, dtype=torch.int64)
    T = torch.ones(B)
    key = torch.arange(B)
    dk.verify_chain(logits, tokens, temperature=T, seeds=key, positions=key,
                    top_k=torch.full((B,), 3, dtype=torch.int32))
    assert seen["verify_chain"] == ("temperature", "top_k", "seeds", "positions")
    dk.verify_chain(logits, tokens)
    assert seen["verify_chain"] == ()


def test_given_is_computed_only_where_a_backend_refuses_an_optional(monkeypatch):
    """ops._run passes given=() when no backend that can run on the device refuses
    an optional argument (resolve's answer cannot depend on it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op in _registry.OPS:
        for device_type in ("cpu", "cuda"):
            refusing = any(_registry.unsupported_args(op, b) for b in _registry.BACKENDS
                           if not _registry._device_reason(b, device_type, False))
            assert _registry.given_matters(op, device_type) == refusing
    assert not _registry.given_matters("verify_chain", "cpu")   # the reference takes everything
    if _registry._load("verify_chain", "cuda")[0] is not None:
        assert _registry.given_matters("verify_chain", "cuda")
    seen = _spy_on_given(monkeypatch)
    B = 2
    key = torch.arange(B)
    dk.verify_chain(torch.randn(B, 3, 11), torch.zeros(B, 3, dtype=torch.int64),
                    temperature=torch.ones(B), seeds=key, positions=key)
    assert seen["verify_chain"] == ()


def test_traced_calls_go_through_the_custom_op():
    from helpers import op_log

    logits = torch.randn(2, 3, 11)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    eager = dk.verify_chain(logits, tokens, backend="reference")
    with op_log() as log:
        traced = dk.verify_chain(logits, tokens, backend="reference")
    assert "dflash.verify_chain.default" in log.ops
    for a, b in zip(eager, traced):
        if a is not None:
            assert torch.equal(a, b)


def test_nvtx_ranges_only_when_enabled(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: marks.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: marks.append(("pop",)))
    logits = torch.randn(2, 3, 11)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    try:
        dk.set_nvtx(True)
        dk.verify_chain(logits, tokens, backend="reference")
    finally:
        dk.set_nvtx(False)
    assert marks == [("push", "dflash::verify_chain [reference]"), ("pop",)]
    dk.verify_chain(logits, tokens, backend="reference")
    assert len(marks) == 2
