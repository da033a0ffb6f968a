"""torch.distributed glue: initialise a process group when launched by ``torchrun`` (gloo on CPU, NCCL
on CUDA). fastinf never schedules processes itself; each rank processes a deterministic shard."""
from __future__ import annotations

import os


def init_from_env() -> bool:
    """Initialise the default process group if torchrun's environment is present; return True if so."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True
