"""GROTrainer on a tiny Llama (CPU, seconds): update direction, offline gold rows, pure offline DPO,
gradient accumulation, checkpoint/resume, and the full sample-score-update loop."""
import json
import math
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


def trainer_for(model, tmp_path, reward_funcs=(reversal_reward,), dataset=None, ref_model=None, teacher_model=None,
                **cfg):
    base = dict(steps=1, prompts_per_step=2, learning_rate=1e-3,
                output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False, backend="torch")
    if reward_funcs:  # the sampling settings (refused offline, where they would be ignored)
        base.update(num_generations=4, max_new_tokens=5)
    base.update(cfg)
    dataset = dataset if dataset is not None else make_prompts(16, 4, seed=1)
    return GROTrainer(model, TOK, reward_funcs=list(reward_funcs), train_dataset=dataset, config=GROConfig(**base),
                      ref_model=ref_model, teacher_model=teacher_model)


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
    from gro_kernels.objective.inputs import read_inputs
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
    inputs = read_inputs(method, dict(rewards=batch.rewards, group_ids=batch.group_ids, offline=batch.offline,
                                      ref_logp=ref_logp, **options))  # reinforce_pp reads no groups
    loss = gro_loss(h, w, batch.targets, bias=b, method=method, backend="torch", **inputs).loss
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


@pytest.mark.parametrize("method", ["rloo", "reinforce_pp"])
def test_exact_kl_in_the_reward_with_two_iterations_matches_naive(tmp_path, method):
    """num_iterations=2 gives gro_loss old_logp; with the exact KL in the reward the one pass used to
    read that KL as zeros (issue 15 item 1): the parameters then differed from backend='naive'."""
    batch = group_batch([1.0, 0.5, 0.0, 0.25], completions=["4321", "4312", "1234", "98"])
    options = {"kl_coef": 0.5, "kl_estimator": "full"}
    grads = {}
    for backend in ("naive", "torch"):
        trainer = trainer_for(tiny_model(), tmp_path, method=method, num_iterations=2, backend=backend,
                              loss_options=options, ref_model=tiny_model(seed=1), max_grad_norm=None)
        trainer.train_step(batch)
        grads[backend] = _flat_grads((p, p.grad) for p in trainer.model.parameters())  # the second update's
    torch.testing.assert_close(grads["torch"], grads["naive"], rtol=1e-4, atol=1e-6)


def test_kto_estimates_its_reference_point_like_trl(tmp_path):
    """Without anchor_value, GROTrainer's KTO estimates z0 per step as TRL's KTOTrainer does: the mean
    over the batch of log pi - log pi_ref of mismatched pairs (each prompt with the previous row's
    completion), clamped at 0. Checked against that computation written here, and the step's
    gradient against gro_loss with anchor_value=z0."""
    from gro_kernels import gro_loss, token_logprobs
    from gro_kernels.trainer.trainer import policy_inputs

    rows = [{"prompt": "1234>", "completion": "4321", "label": True},
            {"prompt": "5678>", "completion": "56", "label": False},
            {"prompt": "9012>", "completion": "2109", "label": True},
            {"prompt": "3456>", "completion": "3456", "label": False}]
    trainer = trainer_for(tiny_model(), tmp_path, reward_funcs=(), dataset=rows, method="kto", prompts_per_step=4,
                          learning_rate=0.0, max_grad_norm=None, ref_model=tiny_model(seed=1))
    batch = trainer.make_batch(0)
    prompts, completions = batch.prompts, batch.completions
    policy, reference = tiny_model(), tiny_model(seed=1)

    def logp(model, completions, grad=False):
        b = collate([TOK.encode(p) for p in prompts],
                    [TOK.encode(c, add_special_tokens=False) + [TOK.eos_token_id] for c in completions],
                    pad_id=TOK.pad_token_id, group_ids=list(range(len(prompts))))
        with torch.set_grad_enabled(grad):
            h, w, bias = policy_inputs(model, b.input_ids, b.attention_mask, b.position_ids, b.prompt_len)
            return token_logprobs(h, w, b.targets, bias=bias, backend="naive").logp, (h, w, bias, b.targets)

    cycled = completions[-1:] + completions[:-1]
    z0 = max(float((logp(policy, cycled)[0] - logp(reference, cycled)[0]).sum(1).mean()), 0.0)
    assert z0 > 0.01   # a case where the reference point matters
    ref_logp = logp(reference, completions)[0]
    _, (h, w, bias, targets) = logp(policy, completions, grad=True)
    loss = gro_loss(h, w, targets, bias=bias, method="kto", labels=batch.labels, ref_logp=ref_logp,
                    anchor_value=z0, backend="naive").loss
    params = list(policy.parameters())
    want = _flat_grads(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))

    metrics = trainer.train_step(batch)
    assert metrics["kto_z0"] == pytest.approx(z0, rel=1e-5)
    got = _flat_grads((p, p.grad) for p in trainer.model.parameters())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # a fixed anchor_value is used as given (no estimate)
    fixed = trainer_for(tiny_model(), tmp_path, reward_funcs=(), dataset=rows, method="kto", prompts_per_step=4,
                        loss_options={"anchor_value": 0.0}, ref_model=tiny_model(seed=1))
    assert "kto_z0" not in fixed.train_step(batch)


# ---- issue 15 item 6: every setting works or fails at construction, naming it ---------------------

def _whole_batch_grads(batch, method, options, **inputs):
    """The reference: one gro_loss call on the whole batch (tiny_model()), its parameter gradients."""
    from gro_kernels import gro_loss
    from gro_kernels.trainer.trainer import policy_inputs

    model = tiny_model()
    h, w, b = policy_inputs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    loss = gro_loss(h, w, batch.targets, bias=b, method=method, rewards=batch.rewards, group_ids=batch.group_ids,
                    backend="torch", **inputs, **options).loss
    params = list(model.parameters())
    return _flat_grads(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))


@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_entropy_bonus_as_a_token_mean_trains_and_splits_exactly(tmp_path, method):
    # loss_options={"entropy_coef": c, "entropy_agg": "token_mean"} crashed at the first step (the
    # trainer zeroed entropy_coef but kept entropy_agg, and passed num_items_in_batch). TRL's bonus:
    # c times the mean entropy of the batch's tokens, the same for any micro_batch_size.
    batch = group_batch([1.0, 0.5, 0.0, 0.25, 0.75, 0.0, 1.0, 0.5], groups=[0, 0, 0, 0, 1, 1, 1, 1],
                        completions=["4321", "4312", "1234", "9876", "5555", "0000", "4320", "21"])
    options = {"entropy_coef": 0.5, "entropy_agg": "token_mean", "kl_coef": 0.0}
    want = _whole_batch_grads(batch, method, options)
    without = _whole_batch_grads(batch, method, {"kl_coef": 0.0})
    assert (want - without).abs().max() > 1e-4   # the bonus moves the gradient
    for micro in (8, 3):
        trainer = trainer_for(tiny_model(), tmp_path, method=method, micro_batch_size=micro, learning_rate=0.0,
                              max_grad_norm=None, loss_options=options)
        trainer.train_step(batch)
        got = _flat_grads((p, p.grad) for p in trainer.model.parameters())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"micro_batch_size={micro}")


@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_mask_truncated_completions_drops_completions_without_eos(tmp_path, method):
    # Accepted at construction, it failed at the first step asking for `truncated`. The trainer knows:
    # a sampled completion that does not end in EOS was cut at max_new_tokens.
    batch = group_batch([1.0, 0.5, 0.0, 0.25, 0.75, 0.0, 1.0, 0.5], groups=[0, 0, 0, 0, 1, 1, 1, 1],
                        completions=["4321", "4312", "1234", "9876", "5555", "0000", "4320", "21"])
    cut = torch.tensor([False, True, False, False, False, False, True, False])
    for i in torch.nonzero(cut).flatten().tolist():   # drop the EOS of rows 1 and 6
        last = int((batch.targets[i] != -100).sum()) - 1
        batch.targets[i, last] = -100
        batch.attention_mask[i, batch.prompt_len + last] = 0
    options = {"mask_truncated_completions": True, "kl_coef": 0.0}
    want = _whole_batch_grads(batch, method, options, truncated=cut)
    trainer = trainer_for(tiny_model(), tmp_path, method=method, micro_batch_size=3, learning_rate=0.0,
                          max_grad_norm=None, loss_options=options)
    trainer.train_step(batch)
    got = _flat_grads((p, p.grad) for p in trainer.model.parameters())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


PAIRS = [{"prompt": "1234>", "chosen": "4321", "rejected": "1234"}]
INVALID = [
    ("dpo with reward functions", dict(method="dpo"), True, "method"),
    ("kto with reward functions", dict(method="kto"), True, "method"),
    ("rollout_correction", dict(method="dapo", loss_options={"rollout_correction": "token_truncate"}), True,
     "rollout_correction"),
    ("off_policy_mask_threshold, one iteration", dict(method="dapo", loss_options={"off_policy_mask_threshold": 0.5}),
     True, "off_policy_mask_threshold"),
    ("top_entropy_quantile over micro-batches", dict(method="dapo", micro_batch_size=4,
                                                     loss_options={"top_entropy_quantile": 0.5}), True,
     "top_entropy_quantile"),
    ("clip_cov over micro-batches", dict(method="clip_cov", micro_batch_size=4), True, "clip_cov"),
    ("groups of one", dict(method="grpo", num_generations=1), True, "num_generations"),
    ("offline_reward without offline_column", dict(method="gro", offline_reward=1.0), True, "offline_reward"),
    ("sampling settings offline", dict(method="dpo", num_generations=4), False, "num_generations"),
    ("top_p offline", dict(method="dpo", top_p=0.9), False, "top_p"),
    ("kl_estimator without KL", dict(method="dapo", loss_options={"kl_estimator": "k2"}), True, "kl_estimator"),
    ("unread loss option", dict(method="grpo", loss_options={"margin": 0.5}), True, "margin"),
    ("mu beside its schedule", dict(method="chord", offline_column="answer", mu_peak=0.5, loss_options={"mu": 0.3}),
     True, "mu_peak"),
]


@pytest.mark.parametrize("config,online,name", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_settings_fail_at_construction_naming_them(tmp_path, config, online, name):
    funcs = (reversal_reward,) if online else ()
    dataset = None if online else PAIRS
    with pytest.raises(ValueError, match=name):
        trainer_for(tiny_model(), tmp_path, reward_funcs=funcs, dataset=dataset, **config)


@pytest.mark.parametrize("setting", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)])
def test_sampler_truncation_with_a_teacher_fails_at_construction(tmp_path, setting):
    # the divergence to a teacher is over the whole vocabulary: refused when the trainer is built (it was refused
    # only at the first step, by gro_loss)
    teacher = build_model(len(TOK), 7, hidden=64, layers=1)
    with pytest.raises(ValueError, match=f"GROConfig.{next(iter(setting))} truncates"):
        trainer_for(tiny_model(), tmp_path, teacher_model=teacher, method="distill", **setting)


def test_mask_truncated_completions_offline_is_an_error(tmp_path):
    rows = [{"prompt": "1234>", "completion": "4321", "reward": 1.0}, {"prompt": "1234>", "completion": "1", "reward": 0.0}]
    with pytest.raises(ValueError, match="mask_truncated_completions.*offline rows are never truncated"):
        trainer_for(tiny_model(), tmp_path, reward_funcs=(), dataset=rows, method="grpo",
                    loss_options={"mask_truncated_completions": True, "kl_coef": 0.0})


@pytest.mark.parametrize("method,options", [("dapo", {"top_entropy_quantile": 0.5, "kl_coef": 0.0}),
                                            ("clip_cov", {"kl_coef": 0.0})])
def test_batch_wide_token_selection_trains_with_the_batch_in_one_call(tmp_path, method, options):
    # Valid when one call sees the whole batch (one process, micro_batch_size >= the step's rows).
    batch = group_batch([1.0, 0.5, 0.0, 0.25, 0.75, 0.0, 1.0, 0.5], groups=[0, 0, 0, 0, 1, 1, 1, 1],
                        completions=["4321", "4312", "1234", "9876", "5555", "0000", "4320", "21"])
    torch.manual_seed(0)   # clip_cov draws its tokens from torch's default generator
    want = _whole_batch_grads(batch, method, options)
    trainer = trainer_for(tiny_model(), tmp_path, method=method, micro_batch_size=8, learning_rate=0.0,
                          max_grad_norm=None, loss_options=options)
    torch.manual_seed(0)
    trainer.train_step(batch)
    got = _flat_grads((p, p.grad) for p in trainer.model.parameters())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---- issue 19: CHORD / HPT (offline rows as SFT rows), the mu schedule, a teacher model -----------------
@pytest.mark.parametrize("method,options", [("chord", {"mu": 0.3}), ("hpt", {"switch_threshold": 0.4})])
def test_sft_role_gradient_does_not_depend_on_micro_batch_size(tmp_path, method, options):
    """CHORD / HPT form their weights on whole groups in the loss; the batch's (online, offline) token
    counts make the two token means exact over micro-batches. Reference: one gro_loss on the whole batch."""
    from gro_kernels import gro_loss
    from gro_kernels.trainer.trainer import policy_inputs

    batch = group_batch([1.0, 0.5, 0.0, 0.25, 0.0, 0.0, 1.0, 0.5], groups=[0, 0, 0, 0, 1, 1, 1, 1],
                        offline=[False, False, False, True] * 2,
                        completions=["4321", "4312", "1234", "9876", "5555", "0000", "4320", "21"])
    model = tiny_model()
    h, w, b = policy_inputs(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    loss = gro_loss(h, w, batch.targets, bias=b, method=method, rewards=batch.rewards, group_ids=batch.group_ids,
                    offline=batch.offline, backend="torch", **options).loss
    params = list(model.parameters())
    want = _flat_grads(zip(params, torch.autograd.grad(loss, params, allow_unused=True)))
    for micro in (8, 4):
        trainer = trainer_for(tiny_model(), tmp_path, method=method, micro_batch_size=micro, learning_rate=0.0,
                              max_grad_norm=None, loss_options=options)
        assert len(trainer.micro_batches(batch)) == 8 // micro   # whole groups
        trainer.train_step(batch)
        got = _flat_grads((p, p.grad) for p in trainer.model.parameters())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{method}, micro_batch_size={micro}")


def test_chord_mu_schedule_is_trinity_rfts_warmup_then_cosine():
    cfg = GROConfig(method="chord", mu_peak=0.5, mu_valley=0.1, mu_warmup_steps=4, mu_decay_steps=10)
    assert [cfg.mu_at(s) for s in (0, 2, 4)] == [0.0, 0.25, 0.5]
    assert cfg.mu_at(9) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert cfg.mu_at(14) == cfg.mu_at(100) == 0.1
    assert GROConfig(method="chord").mu_at(3) is None
    with pytest.raises(ValueError, match="offline_role='sft'"):
        GROConfig(method="grpo", mu_peak=0.5)
    with pytest.raises(ValueError, match="set mu_peak"):
        GROConfig(method="chord", mu_decay_steps=5)


def test_chord_trainer_passes_the_scheduled_mu(tmp_path, monkeypatch):
    from gro_kernels.trainer import trainer as trainer_module

    seen = []
    real = trainer_module.gro_loss
    monkeypatch.setattr(trainer_module, "gro_loss", lambda *a, **k: seen.append(k.get("mu")) or real(*a, **k))
    trainer = trainer_for(tiny_model(), tmp_path, method="chord", offline_column="answer", steps=3,
                          mu_peak=0.6, mu_valley=0.2, mu_warmup_steps=0, mu_decay_steps=2)
    trainer.train()
    assert seen == [0.6, 0.4, 0.2]


def test_distillation_from_a_teacher_model_of_another_size(tmp_path):
    """method='distill' with a teacher twice as wide and no reward function: the trainer samples, the loss is
    the teacher's reverse KL alone, and one step moves the policy's distribution toward the teacher's."""
    from gro_kernels.trainer.trainer import policy_inputs

    teacher = build_model(len(TOK), 7, hidden=64, layers=1)
    model = tiny_model()
    base = dict(method="distill", steps=1, num_generations=4, prompts_per_step=2, max_new_tokens=4,
                learning_rate=1e-2, output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False,
                backend="torch")
    trainer = GROTrainer(model, TOK, train_dataset=make_prompts(8, 4, seed=2), config=GROConfig(**base),
                         teacher_model=teacher)
    batch = trainer.make_batch(0)
    assert float(batch.rewards.abs().sum()) == 0.0

    def kl_to_teacher():
        with torch.no_grad():
            h, w, _ = policy_inputs(trainer.model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                    batch.prompt_len)
            th, tw, _ = policy_inputs(teacher, batch.input_ids, batch.attention_mask, batch.position_ids,
                                      batch.prompt_len)
            lp, lq = torch.log_softmax(h @ w.T, -1), torch.log_softmax(th @ tw.T, -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            return float(kl[batch.targets != -100].mean())

    before = kl_to_teacher()
    m = trainer.train_step(batch)
    assert kl_to_teacher() < before
    assert m["distill"] == pytest.approx(before, rel=1e-4)   # the metric: the mean divergence before the step
    with pytest.raises(ValueError, match="teacher_model and distill_coef go together"):
        GROTrainer(tiny_model(), TOK, reward_funcs=[reversal_reward], train_dataset=make_prompts(8, 4, seed=2),
                   config=GROConfig(**base))


@pytest.mark.parametrize("method", ["gpg", "reinforce"])
def test_trainer_passes_only_the_inputs_the_method_reads(tmp_path, method):
    """The trainer's batch carries group ids and (num_iterations=2) behaviour log-probs for every method; gro_loss
    refuses the ones a method does not read (gpg: no ratio; reinforce: no groups, no ratio), so the trainer passes
    each only where it is read and the step trains."""
    batch = group_batch([1.0, 0.5, 0.0, 0.25], completions=["4321", "4312", "1234", "98"])
    trainer = trainer_for(tiny_model(), tmp_path, method=method, num_iterations=2, loss_options={"kl_coef": 0.0})
    trainer.train_step(batch)
    grads = _flat_grads((p, p.grad) for p in trainer.model.parameters())
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
