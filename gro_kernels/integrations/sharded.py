"""The LM head's parameters as a sharding engine hands them to a loss computed inside the model's forward.

FSDP2 (`fully_shard`) keeps a parameter as a sharded DTensor outside its unit's forward. When an
untied `lm_head` is a unit of its own (verl's FSDP2 wrapping policy does this; accelerate groups it
with the final norm, whose forward gathers it), the fused loss reads the weight without calling
`lm_head.forward`, so the unit's hooks never gather it and never reduce its gradient: the loss must
gather it itself, and say how the gradient of the gathered copy is to be reduced. `DTensor.full_tensor()` alone declares that gradient replicated, so
its backward only keeps this rank's slice of this rank's gradient (the other ranks' contributions
are lost). Declared `Partial("avg")`, its backward reduce-scatters the ranks' gradients with an
average, which is what FSDP2 does for every other parameter (its default gradient divide factor is
the shard group's size); on a mesh dimension where every rank computes the same loss (a replicated
or tensor-parallel dimension) the average of equal gradients is that gradient, so it is right there too.

DeepSpeed ZeRO-3 gathers a partitioned parameter when it is read inside the engine's forward; read
anywhere else it is an empty placeholder, which is refused here with what to do.
"""
from __future__ import annotations

from typing import Optional

import torch


def gathered(t: Optional[torch.Tensor], name: str = "lm_head.weight") -> Optional[torch.Tensor]:
    """`t` whole and differentiable: a sharded DTensor is gathered (gradient averaged back onto the
    shards); a ZeRO-3 parameter that is not gathered is an error; anything else is returned as is."""
    if t is None:
        return None
    if getattr(t, "ds_id", None) is not None and t.numel() == 0:
        raise ValueError(
            f"{name} is partitioned by DeepSpeed ZeRO-3 and not gathered here (shape {tuple(getattr(t, 'ds_shape', ()))} "
            "held as an empty placeholder): compute the loss inside the engine's forward, where ZeRO-3 gathers "
            "the parameters the forward reads (the TRL trainers and `model(..., gro=GROCall(...))` do), or gather "
            "it yourself with deepspeed.zero.GatheredParameters")
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # torch without DTensor: nothing is sharded that way
        return t
    if not isinstance(t, DTensor):
        return t
    ndim = t.device_mesh.ndim
    # Gather with an explicit gradient placement: see the module docstring.
    return t.redistribute(placements=[Replicate()] * ndim).to_local(grad_placements=[Partial("avg")] * ndim)
