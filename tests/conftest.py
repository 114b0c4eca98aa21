"""Shared test setup.

The Triton interpreter must be switched on *before* any ``@triton.jit`` function is defined,
so this happens at the very top, before anything imports ``csrc_triton``. On a machine with
CUDA the kernels compile for real instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset

import random  # noqa: E402

import pytest  # noqa: E402

import tests.kernel_compile  # noqa: E402,F401  (snapshots triton.language before any kernel runs)

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: runs Triton kernels on CPU tensors through the interpreter "
        "(skipped where the kernels compile for CUDA; tests/test_gpu.py covers them there)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(
        reason="Triton on CPU tensors needs the interpreter; tests/test_gpu.py covers the kernels on CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_cpu_triton = "interpreter" in item.keywords or params.get("backend") == "triton"
        if on_cpu_triton and not INTERPRETING:
            item.add_marker(skip_interpreter)


@pytest.fixture
def seed():
    """Seed every RNG the tests touch; returns the seed."""
    value = 1234
    random.seed(value)
    torch.manual_seed(value)
    return value


def poisoned(*shape, dtype=torch.float32, device="cpu"):
    """A tensor full of NaN (or the dtype's minimum for integers): an element a kernel
    forgets to write stays poisoned and fails the comparison."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)


@pytest.fixture
def poison():
    return poisoned


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per session.

    ``STEERKERN_TESTS_WITHOUT_DEFAULT_MODEL=1`` skips the tests that need it (on a machine the
    model package cannot reach, e.g. a lent GPU machine); CI never sets it."""
    if os.environ.get("STEERKERN_TESTS_WITHOUT_DEFAULT_MODEL") == "1":
        pytest.skip("STEERKERN_TESTS_WITHOUT_DEFAULT_MODEL=1")
    from steerkern import load_model

    model, tokenizer = load_model()
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_factory():
    """``factory(arch) -> model``: a tiny random-initialised model of a supported architecture,
    built from a config (no download), cached per architecture for the session."""
    from tests.tiny_models import build_tiny_model

    cache = {}

    def factory(arch):
        if arch not in cache:
            cache[arch] = build_tiny_model(arch)
        return cache[arch]

    return factory
