"""Two CPU processes (gloo, DDP) train on halves of a global batch: the replicas stay identical, and
they end where one process training on the whole batch ends (gradients of the lm_head included,
batch-wide statistics global)."""
import dataclasses
import gc
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gro_kernels.loss")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gro_kernels.demo import CharTokenizer, build_model, make_prompts, reversal_reward  # noqa: E402
from gro_kernels.trainer import GROConfig, GROTrainer, collate  # noqa: E402
from gro_kernels.trainer.distributed import free_port  # noqa: E402

TOK = CharTokenizer()
WORLD = 2

# (method, extra config): token_mean + offline rows + several updates + micro-batches (no_sync);
# a per-sequence mean with a reference model and KL.
CASES = [
    # (with the sampler's truncation and temperature, an fp32 head: the loss's and old log-probs' distribution)
    ("gro", dict(num_iterations=2, micro_batch_size=5, temperature=0.9, top_k=6, top_p=0.95, head_precision="fp32")),
    ("grpo", dict(num_iterations=1, micro_batch_size=20, loss_options={"kl_coef": 0.1})),
    # batch statistics (mean and std of the token returns) over both processes' rows
    ("reinforce_pp", dict(num_iterations=1, micro_batch_size=20, loss_options={"kl_coef": 0.05})),
    # offline rows as SFT rows (issue 19): two token means, counted over both processes
    ("chord", dict(num_iterations=1, micro_batch_size=5, loss_options={"mu": 0.3})),
    ("hpt", dict(num_iterations=1, micro_batch_size=5, loss_options={"switch_threshold": 0.5})),   # group 0 RL, the others SFT
]


def global_batch():
    """4 groups of 5 rows (4 online, 1 offline gold), different completion lengths."""
    comps = ["4321", "432", "1234", "43210", "4321",
             "8765", "5", "8756", "7777", "8765",
             "21", "12", "2211", "1", "21",
             "0", "00", "000", "0000", "0"]
    prompts = ["1234>"] * 5 + ["5678>"] * 5 + ["12>"] * 5 + ["0>"] * 5
    rewards = [1.0, 0.5, 0.0, 0.75, 1.0, 1.0, 0.0, 0.5, 0.25, 1.0, 1.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.25, 0.0, 1.0]
    return collate([TOK.encode(p) for p in prompts],
                   [TOK.encode(c, add_special_tokens=False) + [TOK.eos_token_id] for c in comps],
                   pad_id=TOK.pad_token_id, group_ids=[i // 5 for i in range(20)],
                   offline=[i % 5 == 4 for i in range(20)], rewards=rewards, completions=comps)


def trim(batch):
    """Drop the completion columns no row of `batch` uses: each process then has its own width."""
    c, P = int((batch.targets != -100).sum(1).max()), batch.prompt_len
    return dataclasses.replace(batch, input_ids=batch.input_ids[:, :P + c], attention_mask=batch.attention_mask[:, :P + c],
                               position_ids=batch.position_ids[:, :P + c], targets=batch.targets[:, :c])


def make_trainer(method, extra, world):
    cfg = GROConfig(**{**dict(method=method, steps=1, num_generations=4, prompts_per_step=2 * world, max_new_tokens=5,
                              learning_rate=1e-3, max_grad_norm=0.5, output_dir="unused", metrics_file=None,
                              save_final=False, progress=False, backend="torch"), **extra})
    return GROTrainer(build_model(len(TOK), 0, hidden=32, layers=1), TOK, reward_funcs=[reversal_reward],
                      train_dataset=make_prompts(8, 4, seed=1), config=cfg)


def flat(t):
    return torch.cat([p.detach().flatten() for p in t.model.parameters()])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        batch = global_batch()
        shard = trim(batch.select(range(rank * 10, rank * 10 + 10)))  # two whole groups per process
        for method, extra in CASES:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = make_trainer(method, extra, WORLD)
            assert trainer.wrapped is not trainer.policy  # DDP-wrapped
            metrics = trainer.train_step(shard)
            future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                      if issubclass(w.category, (FutureWarning, DeprecationWarning))]
            torch.save({"params": flat(trainer), "metrics": metrics, "future_warnings": future},
                       os.path.join(out_dir, f"{method}_rank{rank}.pt"))
        trainer = None  # noqa: F841
        leave_together()
    finally:
        dist.destroy_process_group()


def leave_together():
    """Free the wrapped models before their process group and leave at once: a DDP/FSDP object
    outliving `destroy_process_group`, or a rank still finishing, can abort a process at exit."""
    gc.collect()
    dist.barrier()


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for method, extra in CASES:
        r0 = torch.load(tmp_path / f"{method}_rank0.pt")
        r1 = torch.load(tmp_path / f"{method}_rank1.pt")
        assert torch.equal(r0["params"], r1["params"]), f"{method}: replicas differ"
        # building the trainer (DDP wrapper included) warns of nothing deprecated (broadcast_buffers, torch 2.13)
        assert r0["future_warnings"] == [] and r1["future_warnings"] == [], r0["future_warnings"]

        single = make_trainer(method, extra, 1)
        before = flat(single)
        metrics = single.train_step(global_batch())
        after = flat(single)
        assert not torch.equal(before, after)
        # the same update; Adam's 1/sqrt(v) lets float noise on near-zero gradients show at ~lr * 1e-3
        torch.testing.assert_close(r0["params"], after, rtol=0, atol=1e-5, msg=f"{method}: 2 processes != 1")
        moved = (after - before).abs()
        assert ((r0["params"] - after).abs() <= 1e-3 * moved.max()).all()
        for k in ("reward", "loss", "grad_norm"):
            assert abs(r0["metrics"][k] - metrics[k]) <= 1e-4 * max(1.0, abs(metrics[k])), (method, k)
