"""Long-context switches of the trainer, at toy size: sequence packing (rows as one sequence without
padding) and gradient checkpointing change memory and FLOPs, never the numbers. The 32k-token step
with a 151936-word vocabulary is `bench/long_context.py` (minutes on a CPU, not a unit test)."""
import pytest
import torch

pytest.importorskip("transformers")

from gro_kernels.trainer.packing import check_packing  # noqa: E402

from test_trainer import group_batch, tiny_model, trainer_for  # noqa: E402


def uneven_batch():
    # different completion lengths and a shorter prompt: the padded layout has pads on both sides
    b = group_batch([1.0, 0.0, 0.5, 0.25, 0.75, 0.0], groups=[0, 0, 0, 1, 1, 1],
                    completions=["4321", "4", "12", "9876", "55", "000"])
    return b


def grads(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


@pytest.mark.parametrize("switch", [dict(pack_sequences=True), dict(gradient_checkpointing=True),
                                    dict(pack_sequences=True, gradient_checkpointing=True)])
def test_packing_and_checkpointing_change_nothing(tmp_path, switch):
    batch = uneven_batch()
    kw = dict(method="grpo", micro_batch_size=4, learning_rate=0.0, max_grad_norm=None,
              loss_options={"kl_coef": 0.04})
    plain = trainer_for(tiny_model(), tmp_path, **kw)
    other = trainer_for(tiny_model(), tmp_path, **kw, **switch)
    torch.testing.assert_close(other.logprobs(other.model, batch), plain.logprobs(plain.model, batch),
                               rtol=0, atol=1e-5)
    m_plain, m_other = plain.train_step(batch), other.train_step(batch)
    torch.testing.assert_close(grads(other), grads(plain), rtol=1e-4, atol=1e-6)
    assert abs(m_plain["loss"] - m_other["loss"]) <= 1e-5 and abs(m_plain["kl"] - m_other["kl"]) <= 1e-6


def test_packing_probe_refuses_a_model_that_mixes_packed_rows():
    from gro_kernels.trainer.trainer import final_hidden

    def leaky(model, ids, am, pos):  # attention that ignores restarted positions: rows leak into each other
        h = final_hidden(model, ids, None, torch.arange(ids.shape[1])[None])
        return h.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]

    check_packing(tiny_model(), final_hidden)  # the real model: fine
    with pytest.raises(ValueError, match="pack_sequences=False"):
        check_packing(tiny_model(), leaky)
