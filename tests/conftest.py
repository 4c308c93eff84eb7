"""Test set-up: Triton's interpreter on CPU-only machines.

TRITON_INTERPRET=1 must be set before any Triton kernel module is imported, so it
is set here, at collection, when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the tests' tiny tensors gain nothing from threads, and on a loaded 2-core machine
    # every fork/join of a second thread costs milliseconds
    torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force specrt.ops onto the Triton kernels (interpreted on CPU tensors)."""
    monkeypatch.setenv("SPECRT_OPS_BACKEND", "triton")
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama in HF format (96-token vocabulary), shared by the engine,
    pool and fused-drafter tests; read-only."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=5)
