"""Test-suite wiring: the `cuda` and `interpreter` markers.

- `cuda` tests need a GPU; without one they are skipped (CI deselects them with -m "not cuda").
- Every test module runs torch on one intra-op thread (`one_thread`): tiny models lose to thread contention.
- Tests in modules named `test_*_kernel.py` exercise Triton kernels; they are marked `interpreter`
  and `make test` runs them in a second pytest process with TRITON_INTERPRET=1 (the variable must be
  set before triton is imported).
"""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run tens of times faster on one intra-op thread than on contended CPU cores; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if item.module.__name__.endswith("_kernel"):
            item.add_marker(pytest.mark.interpreter)
            if not interpreted and item.get_closest_marker("cuda") is None:
                item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (run through `make test`)"))
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
