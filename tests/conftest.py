import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Codec kernels are compiled by default; Inductor takes seconds per new (codec, shape), so the
# suite runs them eagerly except where a test turns them on (test_kernels, test_semantics).
os.environ.setdefault("ACTCOMPILE_COMPILE_CODECS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
