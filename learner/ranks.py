"""Rank plumbing of the learner: the torch.distributed rendezvous, sums and maxima over every rank, the DeepSpeed
config the policy and the separate critic are built with, and the peak memory of a rank (or any actor).

Nothing here knows about algorithms or models; learner_worker.py and critic.py call it.
"""

from __future__ import annotations

import datetime
import os
import resource
import socket
from typing import Any


def free_master_address() -> tuple[str, int]:
    """This node's address and a free port for rank 0 to host the torch.distributed rendezvous."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


def init_distributed(rank: int, world: int, master_ip: str, master_port: int, num_gpus: float, timeout_s: float,
                     cpu_shm_allreduce: bool = False) -> Any:
    """Join the DeepSpeed/torch.distributed group (gloo on CPU, NCCL on GPU); returns this rank's device."""
    os.environ.update(MASTER_ADDR=master_ip, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0" if num_gpus else str(rank))
    if not num_gpus:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import deepspeed.ops
    import torch

    if not cpu_shm_allreduce:
        # The shm allreduce op JIT-compiles for ~150 s on a fresh machine; gloo alone is correct and fast enough
        # for CPU-sized models (measured, DESIGN.md).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if num_gpus else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def allreduce(values: list[float], device: Any, op: str = "sum") -> list[float]:
    """Sum (or max) of a few floats over every rank, in float64 (token counts and loss sums stay exact)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def adamw(lr: float, weight_decay: float = 0.0) -> dict:
    """DeepSpeed's optimizer entry for torch's AdamW with its fused kernel (CPU and CUDA): one pass over each
    parameter partition instead of a chain of elementwise ops, the same update to ~1e-12 (measured here: 0.32 ->
    0.034 s per step for one ZeRO-2 rank's 67M-element partition of SmolLM2-135M on one core)."""
    return {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True,
                                        "adam_w_mode": True, "fused": True}}


def deepspeed_config(micro_batch: int, world: int, zero_stage: int, lr: float, weight_decay: float,
                     max_grad_norm: float, bf16: bool, grad_accum: int = 1) -> dict:
    """The DeepSpeed config of one trained model: the policy, the separate critic (its own lr), the SFT model and the
    reward model. One place for the ZeRO and optimizer settings every learner shares."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * world * grad_accum,
        # DeepSpeed's default 5e8-element communication buckets cost ~4 GB per rank; 5e7 is plenty here.
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": int(5e7),
                              "allgather_bucket_size": int(5e7)},
        "optimizer": adamw(lr, weight_decay),
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tree_peak_rss_mib() -> float:
    """Peak resident memory of this process plus that of each live process it started (their VmHWM in /proc): an
    actor's own processes, e.g. vLLM's engine core when the engine runs out of process. A sum of peaks, so an upper
    bound when the children peaked at different times. Without /proc (not Linux): this process alone."""
    import psutil

    total_kib = 0
    for child in psutil.Process().children(recursive=True):
        try:
            with open(f"/proc/{child.pid}/status") as f:
                total_kib += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        except OSError:  # exited meanwhile, or no /proc
            continue
    return peak_rss_mib() + total_kib / 1024.0
