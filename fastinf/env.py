"""``python -m fastinf.env``: versions of fastinf and its dependencies and the backends it will use.

Paste its output into bug reports.
"""
from __future__ import annotations

import importlib
import json
import platform
import sys


def report() -> dict:
    """Versions, devices and chosen backends as a dict."""
    import torch

    out: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("fastinf", "torch", "triton", "transformers", "peft", "datasets", "numpy", "faiss", "pyarrow"):
        try:
            m = importlib.import_module(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - report whatever is wrong with the install
            out[mod] = f"unavailable ({type(e).__name__})"
    out["cuda"] = torch.cuda.is_available()
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import fastinf._C  # noqa: F401

        out["native_C"] = "built"
    except ImportError as e:
        out["native_C"] = f"missing ({e}); rebuild with `pip install --no-build-isolation -e .`"
    try:
        import faiss

        out["faiss_gpu"] = hasattr(faiss, "StandardGpuResources")
    except ImportError:
        out["faiss_gpu"] = False
    out["torch_threads"] = torch.get_num_threads()
    return out


if __name__ == "__main__":
    json.dump(report(), sys.stdout, indent=1)
    print()
