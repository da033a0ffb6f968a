"""Test configuration. Environment switches are set here, BEFORE fastinf (or triton) is imported:
offline hub access, and the Triton interpreter so that kernel tests run on CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread per process: tiny-model tests are faster that way on small CI boxes, and fp32 results are
# bit-reproducible only at a fixed thread count (subprocesses inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (or set FASTINF_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present (collection never touches CUDA), and tests
    marked ``slow`` unless ``--runslow`` / ``FASTINF_SLOW=1`` (``make test`` stays within its time budget)."""
    run_slow = config.getoption("--runslow") or os.environ.get("FASTINF_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or FASTINF_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
