"""Bytes each collective of tensor- and context-parallel gro_loss moves, per scored token (2 gloo processes).

    python bench/comm_bytes.py

torch.distributed's all_reduce / all_gather are wrapped to record the size of the buffer each call
hands over (the statistics are float32); the figures per token scale to any N, and README's Scaling
out section multiplies them out for N=8192, V=151936, d=4096. One GRPO call with an entropy bonus,
with and without the exact KL to a sharded reference head, and with top_k / min_p (tensor parallel), and GRPO with old and
reference log-probs and an entropy bonus (context parallel, the tokens split between the ranks).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_ROWS, T, D, V = 8, 16, 32, 64


def _record(log):
    gather, reduce = dist.all_gather, dist.all_reduce

    def all_gather(parts, t, group=None):
        log.append(("all_gather", t.numel() * t.element_size()))
        return gather(parts, t, group=group)

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None):
        log.append((f"all_reduce {str(op).split('.')[-1]}", t.numel() * t.element_size()))
        return reduce(t, op=op, group=group)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce


def _batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N_ROWS, T, D, generator=g)
    weight = 0.3 * torch.randn(V, D, generator=g)
    targets = torch.randint(0, V, (N_ROWS, T), generator=g)
    targets[:, -3:] = -100
    logp = -torch.rand(N_ROWS, T, generator=g) * 3
    return hidden, weight, targets, dict(rewards=torch.rand(N_ROWS, generator=g), group_ids=torch.arange(N_ROWS) // 4,
                                         old_logp=logp, ref_logp=logp + 0.1)


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gro_kernels import gro_loss
    log = []
    _record(log)
    hidden, weight, targets, kw = _batch()
    scored = int((targets != -100).sum())
    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    runs = {
        "TP, GRPO + entropy bonus": dict(kl_coef=0.0, entropy_coef=0.01),
        "TP, GRPO + entropy bonus + exact KL (sharded reference head)": dict(
            kl_coef=0.05, kl_estimator="full", entropy_coef=0.01, ref_hidden=hidden + 0.1, ref_weight=weight[rows] + 0.1),
        "TP, GRPO + entropy bonus, the sampler's top_k=20 and min_p=0.05": dict(
            kl_coef=0.0, entropy_coef=0.01, top_k=20, min_p=0.05),
    }
    report = []
    for name, extra in runs.items():
        log.clear()
        inputs = {k: v for k, v in kw.items() if k != "ref_logp" or "ref_weight" not in extra}
        h = hidden.clone().requires_grad_()
        out = gro_loss(h, weight[rows].clone().requires_grad_(), targets, method="grpo", backend="torch",
                       tp_group=dist.group.WORLD, **inputs, **extra)
        out.loss.backward()
        report.append((name, scored, list(log)))
    log.clear()
    cols = slice(rank * T // 2, (rank + 1) * T // 2)
    local = {k: (v[:, cols] if v.dim() == 2 else v) for k, v in kw.items()}
    h = hidden[:, cols].clone().requires_grad_()
    out = gro_loss(h, weight.clone().requires_grad_(), targets[:, cols], method="grpo", backend="torch",
                   entropy_coef=0.01, cp_group=dist.group.WORLD, **local)
    out.loss.backward()
    report.append(("CP, GRPO + old / reference log-probs + entropy bonus (per local token, scored or not)",
                   targets[:, cols].numel(), list(log)))
    if rank == 0:
        for name, n, calls in report:
            print(f"{name}: {n} tokens on this rank")
            for kind, nbytes in calls:
                print(f"    {kind:16s} {nbytes:7d} B  = {nbytes / n:6.2f} B per token")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from gro_kernels.trainer.distributed import free_port
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)
