"""An LM head that is its own FSDP2 unit, read by the fused loss inside the model's forward (two CPU
processes, gloo): the lm_head gradient is the one process's gradient on the whole batch.

The head's unit never runs `lm_head.forward`, so its weight reaches the loss as a sharded DTensor
(verl's FSDP2 policy makes an untied lm_head a unit of its own). Gathering it with a plain
`full_tensor()` kept only this rank's slice of this rank's gradient (relative error ~1 on main);
`integrations.sharded.gathered` averages the ranks' gradients back onto the shards, as FSDP2 does.
A tied head shares its unit with the embedding ([embed_tokens, lm_head]: torch refuses the head
alone), whose forward gathers it. Checked through `add_gro_head` (TRL's path; GRPO and GSPO) and
through verl's fused log-prob (`register(fused_kernels=True)`)."""
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

from gro_kernels import token_logprobs  # noqa: E402
from gro_kernels.integrations.hf_head import GROCall, add_gro_head  # noqa: E402
from gro_kernels.trainer.distributed import free_port  # noqa: E402

WORLD = 2
B, T, KEEP = 4, 7, 5
# GRPO (per-sequence token means) and GSPO (sequence ratio, so the composable two-pass path); every
# rank holds B / WORLD whole rows, so the mean over ranks of their losses is the whole batch's loss
METHODS = {"grpo": dict(method="grpo", kl_coef=0.0),
           "gspo": dict(method="gspo", eps_low=0.2, eps_high=0.2)}


def build(tie):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=22, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    add_gro_head(model, backend="torch")
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 22, (B, T), generator=g)
    labels = ids.masked_fill(torch.arange(T) < T - KEEP, -100)
    labels[1, -2:] = -100  # one shorter completion
    old = -3.0 + 0.1 * torch.randn(B, KEEP, generator=g)
    return ids, labels, torch.randn(B, generator=g), old


def gro_loss_of(model, method, rows):
    ids, labels, adv, old = (t[rows] for t in batch())
    kw = dict(METHODS[method], advantages=adv)
    if method == "gspo":  # old log-probs near the policy's, so that the sequence ratios are not all clipped
        with torch.no_grad():
            logp = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[:, -KEEP:]
        kw["old_logp"] = logp + 0.05 * old.sin()
    return model(input_ids=ids, labels=labels, gro=GROCall(keep=KEEP, kwargs=kw)).loss


def verl_loss_of(weight, rows):
    """verl's FusedLinearForPPO (on gro_kernels) from fixed hidden states: logp and entropy terms."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, weight.shape[1], generator=g)[rows]
    ids, _, adv, _ = (t[rows] for t in batch())
    logp, entropy = FusedLinearForPPO(impl_backend="torch")(hidden, weight, ids, temperature=0.9)
    return -(adv[:, None] * logp).mean() - 0.1 * entropy.mean()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from gro_kernels.integrations.verl import register, unregister_fused_kernels
    from torch.distributed.fsdp import fully_shard
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    try:
        out = {}
        for tie in (False, True):
            for method in METHODS:
                model = build(tie)
                # the head as a unit of its own (tied: with the embedding it shares its weight with)
                fully_shard([model.model.embed_tokens, model.lm_head] if tie else model.lm_head)
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
                gro_loss_of(model, method, rows).backward()
                out[(tie, method)] = {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}
        model = build(False)
        fully_shard(model.lm_head)
        with pytest.raises(TypeError, match="weight is a sharded DTensor"):  # called directly: refused, not wrong
            token_logprobs(torch.randn(3, 32), model.lm_head.weight, torch.tensor([1, 2, 3]))
        register(fused_kernels=True)
        try:
            model = build(False)
            fully_shard(model.lm_head)
            fully_shard(model)
            verl_loss_of(model.lm_head.weight, rows).backward()  # a sharded DTensor outside lm_head.forward
            out["verl"] = full(model.lm_head.weight.grad).detach().clone()
        except Exception as e:  # reported by the test after the checks above (every rank fails alike)
            out["verl"] = repr(e)
        finally:
            unregister_fused_kernels()
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "grads.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_head_as_its_own_fsdp2_unit_gets_the_whole_gradient(tmp_path):
    pytest.importorskip("verl")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "grads.pt")
    every = slice(0, B)
    for tie in (False, True):
        for method in METHODS:
            model = build(tie)
            gro_loss_of(model, method, every).backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(got[(tie, method)][name], p.grad, rtol=1e-4, atol=1e-7,
                                           msg=lambda m: f"tie={tie} {method} {name}: {m}")
    from gro_kernels.integrations.verl import register, unregister_fused_kernels
    register(fused_kernels=True)
    try:
        model = build(False)
        verl_loss_of(model.lm_head.weight, every).backward()
    finally:
        unregister_fused_kernels()
    assert not isinstance(got["verl"], str), got["verl"]
    torch.testing.assert_close(got["verl"], model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
