"""Long-context switches of the trainer, at toy size: sequence packing (rows as one sequence without
padding) and gradient checkpointing change memory and FLOPs, never the numbers. The 32k-token step
with a 151936-word vocabulary is `bench/long_context.py` (minutes on a CPU, not a unit test)."""
import pytest
import torch

pytest.importorskip("transformers")

from gro_kernels.trainer import trainer as trainer_module  # noqa: E402
from gro_kernels.trainer.packing import check_packing  # noqa: E402

from test_trainer import TOK, build_model, group_batch, tiny_model, trainer_for  # noqa: E402


def uneven_batch():
    # different completion lengths and a shorter prompt: the padded layout has pads on both sides
    b = group_batch([1.0, 0.0, 0.5, 0.25, 0.75, 0.0], groups=[0, 0, 0, 1, 1, 1],
                    completions=["4321", "4", "12", "9876", "55", "000"])
    return b


def grads(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


SWITCHES = [dict(pack_sequences=True), dict(gradient_checkpointing=True),
            dict(pack_sequences=True, gradient_checkpointing=True)]
# per-sequence means with a KL to the reference's log-probs; REINFORCE++'s per-token advantages;
# Dr. GRPO's fixed normalizer with the exact KL from the reference head (packed too)
LOSSES = [("grpo", {"kl_coef": 0.04}), ("reinforce_pp", {"kl_coef": 0.05}),
          ("dr_grpo", {"kl_coef": 0.05, "kl_estimator": "full"})]


# a teacher model beside (its hidden states packed like the policy's): the generalized JSD with the rewards' term
TEACHER = ("distill", {"divergence": "jsd", "jsd_beta": 0.3})


@pytest.mark.parametrize("switch,loss", [(SWITCHES[0], loss) for loss in LOSSES + [TEACHER]]
                         + [(s, LOSSES[0]) for s in SWITCHES[1:]])
def test_packing_and_checkpointing_change_nothing(tmp_path, switch, loss):
    batch = uneven_batch()
    method, options = loss
    kw = dict(method=method, micro_batch_size=4, learning_rate=0.0, max_grad_norm=None, loss_options=options)
    if method == "distill":   # a teacher twice as wide
        kw["teacher_model"] = build_model(len(TOK), 7, hidden=64, layers=1)
    plain = trainer_for(tiny_model(), tmp_path, **kw)
    other = trainer_for(tiny_model(), tmp_path, **kw, **switch)
    seen = []
    real = trainer_module.gro_loss

    def spy(hidden, weight, targets, **loss_kwargs):
        seen.append((tuple(hidden.shape), loss_kwargs.get("sequence_ids")))
        return real(hidden, weight, targets, **loss_kwargs)

    torch.testing.assert_close(other.logprobs(other.model, batch), plain.logprobs(plain.model, batch),
                               rtol=0, atol=1e-5)
    m_plain = plain.train_step(batch)
    trainer_module.gro_loss = spy
    try:
        m_other = other.train_step(batch)
    finally:
        trainer_module.gro_loss = real
    torch.testing.assert_close(grads(other), grads(plain), rtol=1e-4, atol=1e-6)
    assert abs(m_plain["loss"] - m_other["loss"]) <= 1e-5
    assert ("distill" in m_plain) == (method == "distill")
    for name in ("kl", "distill"):
        if name in m_plain:
            assert abs(m_plain[name] - m_other[name]) <= 1e-6, name
    if switch.get("pack_sequences"):  # the loss reads the packed row of the scored tokens' states, [1, K, d]
        scored = [int((batch.targets[i:i + 4] != -100).sum()) for i in range(0, len(batch), 4)]
        assert [(shape[:2], ids.shape) for shape, ids in seen] == [((1, k), (1, k)) for k in scored]


def test_packing_probe_refuses_a_model_that_mixes_packed_rows():
    from gro_kernels.trainer.trainer import final_hidden

    def leaky(model, ids, am, pos):  # attention that ignores restarted positions: rows leak into each other
        h = final_hidden(model, ids, None, torch.arange(ids.shape[1])[None])
        return h.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]

    check_packing(tiny_model(), final_hidden)  # the real model: fine
    with pytest.raises(ValueError, match="pack_sequences=False"):
        check_packing(tiny_model(), leaky)
