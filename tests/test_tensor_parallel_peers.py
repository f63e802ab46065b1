"""Tensor (vocabulary) parallelism against the peers that implement it, 2 gloo processes, one spawn:

- megatron-core's `vocab_parallel_cross_entropy` (its `parallel_state` set up with
  `initialize_model_parallel(tensor_model_parallel_size=2)`): log-probs, and the gradients of this
  rank's weight rows and of hidden (through Megatron's `copy_to_tensor_model_parallel_region`,
  whose backward all-reduces, as gro_kernels' dh);
- Liger's tensor-parallel fallback (`_TensorParallelFusedLinearPPOFallbackFunction`, the path its
  `LigerFusedLinearScaledCrossEntropyTPFunction` takes without Hopper / Blackwell; its public entry
  refuses CPU tensors, so the fallback is called directly): log-probs, entropy and gradients, float32;
- verl's Megatron backend: `register(fused_kernels=True)` routes the `linear_cross_entropy` its fused
  forward calls with the tensor-parallel group (`dist_process_group`) to gro_kernels; against verl's
  own unfused Megatron path (`vocab_parallel_log_probs_from_logits`, `vocab_parallel_entropy` on the
  logits of this rank's slice), which runs on the CPU: log-probs, entropy, and the gradients, the
  hidden one being each rank's part (verl's fused kernel leaves its reduction to the
  sequence-parallel gather in front of it).
Equal shards, as Megatron's (a padded vocabulary split evenly). The peers compute in float32 (Megatron
casts the logits, Liger computes them so): agreement to float32 rounding; tests/test_tensor_parallel.py
checks exactness against one process in float64."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gro_kernels import token_logprobs
from gro_kernels.trainer.distributed import free_port

pytest.importorskip("megatron.core")

WORLD, N, D, V = 2, 24, 16, 48


def inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = 0.7 * torch.randn(V, D, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(2, N, generator=g, dtype=dtype)   # upstream gradients of the log-probs and the entropy
    return h, w, y, up


def grads_of(logp, entropy, h, w, up):
    loss = (up[0] * logp).sum() + (0.0 if entropy is None else (up[1] * entropy).sum())
    return torch.autograd.grad(loss, (h, w))


def diff(a, b):
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch._dynamo.config.disable = True  # verl's vocab_parallel_entropy wraps a product in torch.compile
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        rows = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
        out = {}
        # megatron-core
        h, w, y, up = inputs()
        h1, w1 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
        ours = token_logprobs(h1, w1, y, tp_group=group).logp
        h2, w2 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
        logits = copy_to_tensor_model_parallel_region(h2) @ w2.T
        theirs = -vocab_parallel_cross_entropy(logits[:, None], y[:, None])[:, 0]
        out["megatron"] = diff((ours, *grads_of(ours, None, h1, w1, up)), (theirs, *grads_of(theirs, None, h2, w2, up)))
        # Liger's fallback (float32: it computes the logits in float32)
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import _apply_tp_fallback
        h, w, y, up = inputs(torch.float32)
        h1, w1 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
        st = token_logprobs(h1, w1, y, tp_group=group, temperature=0.7, return_entropy=True)
        h2, w2 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
        nll, entropy = _apply_tp_fallback(h2, w2, y, 0.7, -100, True, group)
        out["liger"] = diff((st.logp, st.entropy, *grads_of(st.logp, st.entropy, h1, w1, up)),
                            (-nll, entropy, *grads_of(-nll, entropy, h2, w2, up)))
        # verl's Megatron backend: the registered kernel against verl's own unfused path
        import verl.models.mcore.model_forward_fused as fused_forward
        from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits
        from gro_kernels.integrations.verl import gro_linear_cross_entropy, register, unregister_fused_kernels
        register(fused_kernels=True)
        try:
            routed = fused_forward.linear_cross_entropy is gro_linear_cross_entropy
            h, w, y, up = inputs()
            h1, w1 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
            logp, ent = fused_forward.linear_cross_entropy(h1[:, None], w1, y[None], 0.8, "none", group)
            h2, w2 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
            logits = (h2 @ w2.T) / 0.8
            logp2 = vocab_parallel_log_probs_from_logits(logits.clone(), y)
            ent2 = vocab_parallel_entropy(logits)
            out["verl"] = diff((logp, ent, *grads_of(logp, ent, h1, w1, up)),
                               (logp2, ent2, *grads_of(logp2, ent2, h2, w2, up)))
        finally:
            unregister_fused_kernels()
        out["routed"] = routed and fused_forward.linear_cross_entropy is not gro_linear_cross_entropy
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_megatron_liger_and_verl_agree(tmp_path):
    pytest.importorskip("liger_kernel")
    pytest.importorskip("verl")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        # the peers compute in float32 (Megatron casts the logits; Liger computes them so)
        assert out["megatron"] < 1e-5 and out["verl"] < 1e-5 and out["liger"] < 2e-5 and out["routed"], out
