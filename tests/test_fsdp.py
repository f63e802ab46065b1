"""FSDP2 (`fully_shard`) in the trainer, two CPU processes (gloo): the loss and the gradients of a
step on halves of a global batch equal one process's on the whole batch; `gro_loss` runs inside
the wrapped forward on the gathered (plain, full) lm_head weight, gathered once per update; sampling works on the shards;
a checkpoint saved from the shards reloads into a fresh sharded trainer."""
import os

import pytest
import torch

pytest.importorskip("transformers")
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gro_kernels.trainer import trainer as trainer_module  # noqa: E402
from gro_kernels.trainer.distributed import free_port  # noqa: E402

from test_distributed import global_batch, leave_together, make_trainer  # noqa: E402

WORLD = 2
# token_mean with micro-batches that cut through groups (root kept gathered between them), and a
# per-sequence mean with a reference model and KL
CASES = [
    ("gro", dict(micro_batch_size=3, max_grad_norm=None)),
    ("grpo", dict(micro_batch_size=20, max_grad_norm=0.5, loss_options={"kl_coef": 0.1})),
]


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def flat_grads(trainer):
    return torch.cat([full(p.grad).detach().flatten() for p in trainer.model.parameters()])


def flat_params(trainer):
    return torch.cat([full(p).detach().flatten() for p in trainer.model.parameters()])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    seen = []
    real = trainer_module.gro_loss

    def spy(hidden, weight, targets, **kw):
        seen.append((hasattr(weight, "full_tensor"), tuple(weight.shape)))  # (a DTensor shard?, shape)
        return real(hidden, weight, targets, **kw)

    trainer_module.gro_loss = spy
    try:
        shard = global_batch().select(range(rank * 10, rank * 10 + 10))
        for method, extra in CASES:
            trainer = make_trainer(method, {**extra, "fsdp": True}, WORLD)
            assert trainer.fsdp
            trainer.make_batch(0)  # sampling first runs the layers outside the wrapped forward
            gathers, all_gather = [], dist.all_gather_single  # FSDP2's all-gather: one call per group unshard
            dist.all_gather_single = lambda out, *a, **k: gathers.append(out.numel()) or all_gather(out, *a, **k)
            try:
                metrics = trainer.train_step(shard)
            finally:
                dist.all_gather_single = all_gather
            root = sum(p.numel() for n, p in trainer.model.named_parameters() if ".layers." not in n)
            torch.save({"grads": flat_grads(trainer), "params": flat_params(trainer), "metrics": metrics,
                        "seen": seen, "gathers": gathers, "root": root, "micro": len(trainer.micro_batches(shard))},
                       os.path.join(out_dir, f"{method}_rank{rank}.pt"))
        path = trainer.save_checkpoint(os.path.join(out_dir, "ckpt"))
        fresh = make_trainer(method, {**extra, "fsdp": True}, WORLD)
        fresh.load_checkpoint(path)
        same = torch.equal(flat_params(fresh), flat_params(trainer))
        fresh.train_step(shard)
        trainer.train_step(shard)  # the optimizer state came back too: the next step is the same
        torch.save({"same": same, "next_equal": torch.equal(flat_params(fresh), flat_params(trainer))},
                   os.path.join(out_dir, f"ckpt_rank{rank}.pt"))
        trainer = fresh = None  # noqa: F841
        leave_together()
    finally:
        trainer_module.gro_loss = real
        dist.destroy_process_group()


def test_fsdp_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for method, extra in CASES:
        r0 = torch.load(tmp_path / f"{method}_rank0.pt", weights_only=False)
        r1 = torch.load(tmp_path / f"{method}_rank1.pt", weights_only=False)
        torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
        single = make_trainer(method, extra, 1)
        vocab, dim = single.model.get_output_embeddings().weight.shape
        assert set(r0["seen"]) == {(False, (vocab, dim))}  # the gathered weight, not a shard
        # lm_head's group (embeddings, norm, head) gathered once per update, whatever the micro-batches;
        # the one decoder layer twice per micro-batch (forward, backward)
        assert r0["gathers"].count(r0["root"]) == 1 and len(r0["gathers"]) == 1 + 2 * r0["micro"], r0["gathers"]
        metrics = single.train_step(global_batch())
        want = torch.cat([p.grad.flatten() for p in single.model.parameters()])
        torch.testing.assert_close(r0["grads"], want, rtol=1e-4, atol=1e-6, msg=f"{method}: gradients")
        torch.testing.assert_close(r0["params"], torch.cat([p.detach().flatten() for p in single.model.parameters()]),
                                   rtol=0, atol=1e-5, msg=f"{method}: parameters after the step")
        for k in ("loss", "reward", "grad_norm"):
            assert abs(r0["metrics"][k] - metrics[k]) <= 1e-4 * max(1.0, abs(metrics[k])), (method, k)
    for rank in range(WORLD):
        ck = torch.load(tmp_path / f"ckpt_rank{rank}.pt")
        assert ck["same"] and ck["next_equal"], ck
