"""GROTrainer on a tiny Llama (CPU, seconds): update direction, offline gold rows, pure offline DPO,
gradient accumulation, checkpoint/resume, and the full sample-score-update loop."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gro_kernels.loss")

from gro_kernels.demo import CharTokenizer, build_model, make_prompts, reversal_reward  # noqa: E402
from gro_kernels.trainer import GROConfig, GROTrainer, collate  # noqa: E402

TOK = CharTokenizer()


def tiny_model(seed=0):
    return build_model(len(TOK), seed, hidden=32, layers=1)


def trainer_for(model, tmp_path, reward_funcs=(reversal_reward,), dataset=None, ref_model=None, **cfg):
    base = dict(steps=1, num_generations=4, prompts_per_step=2, max_new_tokens=5, learning_rate=1e-3,
                output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False, backend="torch")
    base.update(cfg)
    dataset = dataset if dataset is not None else make_prompts(16, 4, seed=1)
    return GROTrainer(model, TOK, reward_funcs=list(reward_funcs), train_dataset=dataset, config=GROConfig(**base),
                      ref_model=ref_model)


def test_config_names_a_misspelled_setting_and_a_loss_option_given_as_a_setting():
    with pytest.raises(TypeError, match=r"'num_generation' \(did you mean 'num_generations'"):
        GROConfig(num_generation=4)
    with pytest.raises(TypeError, match=r"loss_options=\{'kl_coef'"):
        GROConfig(kl_coef=0.1)
    with pytest.raises(TypeError, match=r"'kl_coeff' \(did you mean 'kl_coef'"):
        GROConfig(loss_options={"kl_coeff": 0.1}).resolved_options()
    assert GROConfig(num_generations=4, temperature=0.7).temperature == 0.7


def group_batch(rewards, offline=None, completions=None, groups=None):
    """Rows of one prompt ("1234>") with distinct completions and the given rewards."""
    n = len(rewards)
    completions = completions or ["4321", "4312", "1234", "9876", "5555", "0000", "4320", "2143"][:n]
    return collate([TOK.encode("1234>")] * n,
                   [TOK.encode(c, add_special_tokens=False) + [TOK.eos_token_id] for c in completions],
                   pad_id=TOK.pad_token_id, group_ids=groups or [0] * n,
                   offline=offline or [False] * n, rewards=rewards, completions=completions)


def seq_logp(trainer, batch):
    lp = trainer.logprobs(trainer.model, batch)
    return lp.sum(1)


@pytest.mark.parametrize("method", ["grpo", "rloo", "gro", "dapo", "dr_grpo"])
def test_step_moves_likelihoods_the_way_the_weights_say(tmp_path, method):
    trainer = trainer_for(tiny_model(), tmp_path, method=method, loss_options={"kl_coef": 0.0})
    rewards = [1.0, 0.75, 0.0, 0.0]
    batch = group_batch(rewards)
    before = seq_logp(trainer, batch)
    trainer.train_step(batch)
    delta = seq_logp(trainer, batch) - before
    anchor = sum(rewards) / len(rewards)
    for r, d in zip(rewards, delta.tolist()):
        assert (d > 0) == (r > anchor), (method, rewards, delta)
    assert not torch.equal(before, seq_logp(trainer, batch))


def test_offline_gold_answer_is_pushed_up_and_failures_down(tmp_path):
    trainer = trainer_for(tiny_model(), tmp_path, method="gro")
    batch = group_batch([0.0, 0.0, 0.0, 0.0, 1.0], offline=[False] * 4 + [True],
                        completions=["9876", "5555", "0000", "8888", "4321"])
    before = seq_logp(trainer, batch)
    trainer.train_step(batch)
    delta = seq_logp(trainer, batch) - before
    assert delta[4] > 0, delta  # the gold answer: the group's only positive
    assert (delta[:4] < 0).all(), delta


def test_rollout_mixes_gold_rows_into_their_prompts_groups(tmp_path):
    trainer = trainer_for(tiny_model(), tmp_path, method="gro", offline_column="answer", offline_per_group=1)
    batch = trainer.make_batch(0)
    K = trainer.config.num_generations
    assert len(batch) == 2 * (K + 1)
    assert batch.offline.tolist() == ([False] * K + [True]) * 2
    assert batch.group_ids.tolist() == [0] * (K + 1) + [1] * (K + 1)
    rows = trainer.rows_for_step(0)
    gold = [i for i, o in enumerate(batch.offline.tolist()) if o]
    assert [batch.completions[i] for i in gold] == [r["answer"] for r in rows]
    assert batch.rewards[gold].tolist() == [1.0, 1.0]  # scored by the reward function
    # completion targets end with EOS; nothing after it is a target
    for i in gold:
        t = batch.targets[i][batch.targets[i] != -100].tolist()
        assert t == TOK.encode(batch.completions[i], add_special_tokens=False) + [TOK.eos_token_id]
    metrics = trainer.train_step(batch)
    assert metrics["offline_reward"] == 1.0 and 0.0 <= metrics["reward"] <= 1.0


def test_pure_offline_dpo_raises_the_preference_margin(tmp_path):
    pairs = [{"prompt": "1234>", "chosen": "4321", "rejected": "1234"},
             {"prompt": "5678>", "chosen": "8765", "rejected": "5678"}]
    trainer = trainer_for(tiny_model(), tmp_path, reward_funcs=(), dataset=pairs, method="dpo",
                          loss_options={"beta": 0.5})
    assert trainer.ref_model is not None and not trainer.online
    batch = trainer.make_batch(0)
    assert batch.labels.tolist() == [1, -1, 1, -1] and batch.group_ids.tolist() == [0, 0, 1, 1]
    before = seq_logp(trainer, batch)
    trainer.train_step(batch)
    after = seq_logp(trainer, batch)
    margin = lambda s: (s[0] - s[1] + s[2] - s[3]).item()  # noqa: E731
    assert margin(after) > margin(before)


@pytest.mark.parametrize("method", ["gro", "grpo"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, method):
    batch = group_batch([1.0, 0.5, 0.0, 0.25] * 2, groups=[0, 0, 0, 0, 1, 1, 1, 1],
                        offline=[False, False, False, True] * 2,
                        completions=["4321", "4312", "1234", "9876", "5555", "0000", "4320", "21"])
    params, grads = [], []
    for micro in (8, 4):
        trainer = trainer_for(tiny_model(), tmp_path, method=method, micro_batch_size=micro, num_iterations=2,
                              loss_options={"kl_coef": 0.0})
        assert len(trainer.micro_batches(batch)) == 8 // micro
        trainer.train_step(batch)
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))  # the last update's
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    # Adam divides by sqrt(v): float noise on near-zero gradients moves a weight by up to ~lr * 1e-3
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-5)


def _flat_grads(params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in params])


@pytest.mark.parametrize("method,options", [("reinforce_pp", {"kl_coef": 0.05}), ("grpo", {"kl_coef": 0.0}),
                                            ("gro", {"offline_coef": 0.5})])
def test_gradient_does_not_depend_on_micro_batch_size(tmp_path, method, options):
    """Weights are formed on the whole batch, then split: REINFORCE++'s batch mean/std of the returns
    and a group's mean/std are the same whether or not the micro-batches cut through them. The
    reference is one `gro_loss` call on the whole batch."""
    from gro_kernels import gro_loss, token_logprobs
    from gro_kernels.trainer.trainer import policy_inputs

    batch = group_batch([1.0, 0.5, 0.0, 0.25, 0.75, 0.0, 1.0, 0.5], groups=[0, 0, 0, 0, 1, 1, 1, 1],
                        offline=[False, False, False, True] * 2,
                        completions=["4321", "4312", "1234", "9876", "5555", "0000", "4320", "21"])
    ref_model = tiny_model(seed=1)  # a reference that differs from the policy: a non-zero KL in the reward
    with torch.no_grad():
        rh, rw, rb = policy_inputs(ref_model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                   batch.prompt_len)
        ref_logp = token_logprobs(rh, rw, batch.targets, bias=rb, backend="torch").logp
    model = tiny_model()
    h, w, b = policy_inputs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    loss = gro_loss(h, w, batch.targets, bias=b, method=method, rewards=batch.rewards, group_ids=batch.group_ids,
                    offline=batch.offline, ref_logp=ref_logp, backend="torch", **options).loss
    params = list(model.parameters())
    want = _flat_grads(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))

    for micro in (8, 3, 1):
        trainer = trainer_for(tiny_model(), tmp_path, method=method, micro_batch_size=micro, learning_rate=0.0,
                              max_grad_norm=None, loss_options=options, ref_model=tiny_model(seed=1))
        mbs = trainer.micro_batches(batch)
        assert max(len(m) for m in mbs) <= micro and sorted(sum(mbs, [])) == list(range(8))
        trainer.train_step(batch)
        got = _flat_grads((p, p.grad) for p in trainer.model.parameters())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{method}, micro_batch_size={micro}")


def test_train_loop_writes_metrics_and_checkpoint(tmp_path):
    trainer = trainer_for(tiny_model(), tmp_path, method="grpo", steps=2, metrics_file="metrics.jsonl",
                          save_final=True)  # grpo: kl_coef 0.04 by default, so a reference copy exists
    assert trainer.ref_model is not None
    history = trainer.train()
    assert len(history) == 2
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    for k in ("reward", "reward_std", "kl", "loss", "grad_norm", "completion_length"):
        assert k in lines[-1] and lines[-1][k] == lines[-1][k], k
    assert os.path.exists(tmp_path / "checkpoint-2" / "trainer_state.pt")


def test_checkpoint_reloads_and_continues_like_the_uninterrupted_run(tmp_path):
    kw = dict(method="gro", offline_column="answer", num_iterations=2, steps=3)
    full = trainer_for(tiny_model(), tmp_path / "a", **kw)
    full.train()

    first = trainer_for(tiny_model(), tmp_path / "b", **{**kw, "steps": 2})
    first.train()
    ckpt = first.save_checkpoint()
    assert os.path.basename(ckpt) == "checkpoint-2"

    resumed = trainer_for(tiny_model(), tmp_path / "c", **kw)  # a fresh model and trainer
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 2
    resumed.train()
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert full.history[-1]["reward"] == resumed.history[-1]["reward"]


def _steps(path):
    return [json.loads(x)["step"] for x in open(path)]


def test_resume_truncates_the_metrics_at_the_checkpoint(tmp_path):
    kw = dict(method="grpo", steps=3, save_every=1, metrics_file="metrics.jsonl", loss_options={"kl_coef": 0.0})
    trainer_for(tiny_model(), tmp_path, **kw).train()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    resumed = trainer_for(tiny_model(), tmp_path, **kw)
    resumed.load_checkpoint(str(tmp_path / "checkpoint-1"))
    resumed.train()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]  # steps 2 and 3 rewritten, not repeated


def test_ctrl_c_keeps_the_metrics_and_checkpoints_the_last_finished_step(tmp_path):
    calls = []

    def reward(prompts, completions, **cols):
        calls.append(1)
        if len(calls) == 3:  # during the rollout of step 3
            raise KeyboardInterrupt
        return reversal_reward(prompts, completions, **cols)

    trainer = trainer_for(tiny_model(), tmp_path, reward_funcs=(reward,), method="grpo", steps=5,
                          metrics_file="metrics.jsonl", loss_options={"kl_coef": 0.0})
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "metrics.jsonl"]
    resumed = trainer_for(tiny_model(), tmp_path, method="grpo", steps=5)
    resumed.load_checkpoint(str(tmp_path / "checkpoint-2"))
    assert resumed.step == 2
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_an_interrupted_checkpoint_write_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    trainer = trainer_for(tiny_model(), tmp_path, method="grpo", loss_options={"kl_coef": 0.0})
    good = trainer.save_checkpoint(str(tmp_path / "ckpt"))
    before = sorted(os.listdir(good))

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken)  # dies after save_pretrained, before trainer_state.pt
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(tmp_path / "new"))
    monkeypatch.undo()
    assert sorted(os.listdir(good)) == before  # the old checkpoint is whole
    assert not os.path.exists(tmp_path / "new")
    trainer.save_checkpoint(str(tmp_path / "ckpt"))  # a retry replaces it and cleans up after itself
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "new.tmp"]  # only the unfinished other write remains
