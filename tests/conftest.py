import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. This must be
# set before any kernel is decorated, i.e. before fsam_fused.kernels is first imported.
# (The code-generation test compiles in a subprocess without it.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CUDA parameter carries the `cuda` marker, so `pytest -m cuda` (bench/gpu_check.sh) runs
# every test on CUDA tensors and nothing else.
DEVICES = ["cpu"] + (
    [pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else []
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _double_buffer_small_tensors(monkeypatch):
    """The test models are small: let the C++ backend double-buffer tensors of any size, so
    the whole matrix runs that path ("cpp-fixed" runs the exact copy); test_cpp checks the
    size threshold itself."""
    from fsam_fused.backends import cpp

    monkeypatch.setattr(cpp, "SWAP_MIN_NUMEL", 1)
