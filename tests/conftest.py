import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. This must be
# set before any kernel is decorated, i.e. before fsam_fused.kernels is first imported.
# (The code-generation test compiles in a subprocess without it.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.name and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
