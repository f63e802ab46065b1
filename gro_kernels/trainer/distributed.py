"""torchrun helpers: DistributedDataParallel (default) or FSDP2 (`GROConfig(fsdp=True)`).

How gradients stay synchronized (the one subtle point). DDP all-reduces a parameter's gradient
only for parameters used in a forward *through the DDP wrapper*. The loss here needs the
backbone's final hidden states *and* the `lm_head` weight (the vocabulary projection happens
inside `gro_loss`, never as full logits). Wrapping only the backbone would leave `lm_head`'s
gradient un-synchronized and the replicas would drift. So the trainer wraps `PolicyLoss`
(`trainer.py`): a module holding the whole causal LM whose `forward` runs the backbone *and*
`gro_loss` and returns the loss. Every parameter, `lm_head` included (tied or not), is then
reached from the wrapped forward and DDP's bucketed all-reduce covers all of them, overlapped
with the backward pass. Gradient accumulation uses `no_sync()` on all but the last micro-batch.

DDP averages gradients over the `W` processes. The trainer wants the gradient of the loss of the
*global* batch, so each process normalizes its loss by global counts (tokens via
`num_items_in_batch`, or rows) and multiplies it by `W`: the average of the `W` local gradients
is then exactly the single-process gradient of the global batch (tested in
`tests/test_distributed.py`). Reward-scored weights (group and batch statistics, REINFORCE++'s
batch mean and std) are formed once on the rows of all processes (`batch_weights.py`).
"""
from __future__ import annotations

import inspect
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """Rank, world size and the device this process should use (initialized or not)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if not is_distributed():
        return DistInfo(0, 1, local, device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialize the process group from torchrun's environment (NCCL on CUDA, gloo on CPU).

    A no-op returning rank 0 of 1 when not launched by torchrun (no `WORLD_SIZE` in the environment).
    """
    if is_distributed():
        return info()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return info()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return info()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max); identity outside a process group."""
    if is_distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `module` (already on `device`); the module itself outside a process group."""
    if not is_distributed() or dist.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    # No buffer broadcast before each forward (the model's buffers, e.g. rotary frequencies, are the
    # same on every process). torch >= 2.13 names this forward_sync_buffers and deprecates broadcast_buffers.
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers")
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False})


def wrap_fsdp(module: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) around `module` (the `PolicyLoss` holding `model`); the module itself
    outside a process group.

    Each decoder layer (`model._no_split_modules`, the Hugging Face convention) is its own shard
    group, gathered for its forward and again for its backward. The rest (embeddings, final norm,
    `lm_head`, tied or not) belongs to the root group `module`: gathered when the wrapped forward
    starts and kept unsharded through its backward (`reshard_after_forward=False`), so `gro_loss`
    sees one plain `[V, d]` weight however many vocabulary chunks it takes. The trainer also keeps
    the root unsharded between the micro-batches of an update: one gather of `lm_head` per update.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return module
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    for sub in model.modules():
        if type(sub).__name__ in names:
            fully_shard(sub)
    root = fully_shard(module, reshard_after_forward=False)
    # Make `module` the root now: sampling runs the decoder layers before the first wrapped forward,
    # and FSDP would otherwise take the first layer it sees for the root. (No public call does this.)
    root._get_fsdp_state()._lazy_init()
    return root


def is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no public FSDP2, so nothing was sharded with it
        return False
    return isinstance(module, FSDPModule)


def free_port() -> int:
    """A free localhost TCP port (for tests that start their own process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
