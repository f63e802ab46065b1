"""gro_kernels.integrations.trl against TRL itself: the same batch through TRL's own trainer and through
the patched one gives the same loss, the same gradient of every model parameter and the same metrics.

A tiny Llama and a character tokenizer are built locally (tests/trl_fixtures.py): nothing is downloaded.
"""
import pytest
import torch

trl = pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gro_kernels.integrations.trl import GROGRPOTrainer, GRPO_LOSS_TYPES, patch_trainer  # noqa: E402

from trl_fixtures import assert_grads_close, build_tokenizer, grads, perturb, save_tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tied_model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), tie=True)


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gemma2"), softcap=3.0)


def reward_len(completions, **kwargs):
    return [len(c) / 8 for c in completions]


def prompts_dataset(n=8):
    from datasets import Dataset
    return Dataset.from_dict({"prompt": [f"{i}{i + 1}>" for i in range(n)]})


def grpo_config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                logging_steps=1, seed=0, learning_rate=1e-2)
    base.update(overrides)
    return GRPOConfig(**base)


# ---- the same batch through TRL's loss and through gro_kernels' --------------------------------------

def grpo_batch(trainer, *, off_policy, beta, tool_mask=False, vllm_is=None, sampling=False, seed=0, B=4, P=4, K=6):
    """A GRPO micro-batch in TRL's layout: left-padded prompts, right-padded completions (one empty),
    advantages, and old / reference log-probs that differ from the policy's (so ratios clip)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, 22, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(2, 22, (B, K), generator=g)
    lengths = torch.tensor([K, 3, 1, 5])[:B]
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                 num_items_in_batch=completion_mask.sum() * 3)  # the generation batch spans more micro-batches
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        logp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, torch.cat([prompt_mask, completion_mask], 1), K)
    if off_policy:
        batch["old_per_token_logps"] = logp + 0.4 * torch.randn(B, K, generator=g)
    if beta:
        batch["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, K, generator=g)
    if vllm_is:  # TRL's truncated / masked importance ratio (token or sequence level): >= 0, some exactly 0
        shape = (B, K) if vllm_is == "token" else (B, 1)
        ratio = torch.exp(0.3 * torch.randn(shape, generator=g)).clamp(max=1.5)
        ratio[0, 0] = 0.0
        if vllm_is == "token":  # TRL's ratio is exp(0) = 1 at padding (it masks the log-prob difference)
            ratio = torch.where(completion_mask.bool(), ratio, torch.ones(()))
        batch["importance_sampling_ratio"] = ratio
    if sampling:  # the sampler's (vLLM's) log-probs, one token it could not score (NaN, as TRL passes it);
        # below the policy's, so the off-policy mask measured from them keeps rows the old log-probs would drop
        sampler = logp - 1.0 + 0.1 * torch.randn(B, K, generator=g)
        sampler[1, 0] = float("nan")
        batch["sampling_per_token_logps"] = sampler
    if tool_mask:
        tm = torch.ones(B, K, dtype=torch.long)
        tm[1, 1] = 0
        batch["tool_mask"] = tm
    return batch


def loss_grads_metrics(trainer, batch):
    mode = "train" if trainer.model.training else "eval"
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics[mode].clear()
    trainer._total_train_tokens = 0  # a running count: start both runs from the same value
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: list(v) for k, v in trainer._metrics[mode].items()}
    return loss.detach(), grads(trainer.model), metrics


def compare_grpo(tmp_path, model_path, batch_kw, gas=1, train=True, **config):
    args = grpo_config(tmp_path, gradient_accumulation_steps=gas, **config)
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=prompts_dataset(),
                          processing_class=build_tokenizer())
    trainer.model.train(train)
    trainer.current_gradient_accumulation_steps = gas
    if batch_kw.get("vllm_is"):  # vLLM is not installed here: switch TRL's correction on after construction
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    if batch_kw.pop("last_entropy", None) is not None:  # the adaptive controller's previous step
        trainer._last_world_entropy = 0.0  # below the target: this step applies the bonus
    state = lambda: (trainer.entropy_coef, trainer._last_world_entropy)  # noqa: E731
    start = state()
    batch = grpo_batch(trainer, beta=config.get("beta", 0.0), **batch_kw)
    ref = loss_grads_metrics(trainer, batch)
    ref_state = state()
    trainer.entropy_coef, trainer._last_world_entropy = start  # the adaptive controller starts over
    patch_trainer(trainer)
    assert type(trainer).__name__ == "GROGRPOTrainer"
    ours = loss_grads_metrics(trainer, batch)
    assert state() == pytest.approx(ref_state)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=1e-6)
    assert_grads_close(ours[1], ref[1])
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert ours[2][name] == pytest.approx(ref[2][name], rel=1e-4, abs=1e-6), name
    return ref


CASES = [
    # (loss_type, config overrides, batch options)
    ("grpo", dict(beta=0.04, use_bias_correction_kl=False), dict(off_policy=True)),
    ("grpo", dict(), dict(off_policy=False)),
    ("bnpo", dict(beta=0.1, use_bias_correction_kl=False, entropy_coef=0.05), dict(off_policy=True)),
    ("dr_grpo", dict(entropy_coef=0.05), dict(off_policy=True)),
    ("dapo", dict(epsilon_high=0.28), dict(off_policy=True, tool_mask=True)),
    ("dapo", dict(beta=0.02, use_bias_correction_kl=False, entropy_coef=0.1, delta=1.5), dict(off_policy=True)),
    ("dapo", dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2), dict(off_policy=True)),
    ("cispo", dict(epsilon_high=1.2), dict(off_policy=True)),
    ("cispo", dict(epsilon_high=5.0, entropy_coef=0.05), dict(off_policy=False)),
    ("grpo", dict(importance_sampling_level="sequence", temperature=0.7, cast_lm_head_to_fp32=True),
     dict(off_policy=True)),
    ("dapo", dict(beta=0.04, use_bias_correction_kl=False, delta=1.5), dict(off_policy=True, vllm_is="token")),
    ("grpo", dict(importance_sampling_level="sequence"), dict(off_policy=True, vllm_is="sequence")),
    # adaptive entropy: bonus on (last step's entropy 0 <= target), coefficient raised after the step ...
    ("bnpo", dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=5.0),
     dict(off_policy=True, last_entropy=0.0)),
    # ... and TRL's first step (no entropy seen yet): bonus off, coefficient lowered after the step
    ("cispo", dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=0.1), dict(off_policy=True)),
    # TRL's default use_bias_correction_kl=True: the KL term times the token / sequence ratio (and the kl metric)
    ("grpo", dict(beta=0.04), dict(off_policy=True)),
    ("bnpo", dict(beta=0.1, importance_sampling_level="sequence", delta=1.5), dict(off_policy=True)),
    ("dapo", dict(beta=0.04), dict(off_policy=False, vllm_is="token")),
    # the entropy bonus with per-sequence means (TRL's token mean: entropy_agg="token_mean")
    ("grpo", dict(entropy_coef=0.05, beta=0.04), dict(off_policy=True)),
    ("grpo", dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=5.0), dict(off_policy=True, last_entropy=0.0)),
    # SAPO, LUSPO, VESPO
    ("sapo", dict(beta=0.04, entropy_coef=0.05), dict(off_policy=True)),
    ("sapo", dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0), dict(off_policy=True, vllm_is="token")),
    ("luspo", dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2, beta=0.04), dict(off_policy=True)),
    ("luspo", dict(entropy_coef=0.05), dict(off_policy=True, tool_mask=True)),
    ("vespo", dict(), dict(off_policy=True)),
    ("vespo", dict(importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=False), dict(off_policy=True)),
    ("vespo", dict(beta=0.04), dict(off_policy=True, vllm_is="token")),   # TRL folds the vLLM ratio into phi
    ("vespo", dict(beta=0.04, entropy_coef=0.05, vespo_k_pos=1.5, vespo_lambda_neg=2.5), dict(off_policy=True)),
    # DeepSeek-V3.2's off-policy sequence mask, and the high-entropy token selection
    # (seed 1: rows with A < 0 drift past the threshold, so the mask drops some; seed 0 drops none)
    ("dapo", dict(off_policy_mask_threshold=0.02, beta=0.04), dict(off_policy=True, seed=1)),
    ("sapo", dict(off_policy_mask_threshold=0.0), dict(off_policy=True, vllm_is="sequence", seed=1)),
    ("luspo", dict(off_policy_mask_threshold=0.01), dict(off_policy=True, vllm_is="token", sampling=True, seed=1)),
    ("grpo", dict(top_entropy_quantile=0.5), dict(off_policy=True)),
    # ... with TRL's bonus over the selected tokens (its policy_loss metric and controller read their entropy)
    ("grpo", dict(top_entropy_quantile=0.5, entropy_coef=0.05, beta=0.04), dict(off_policy=True)),
    ("bnpo", dict(top_entropy_quantile=0.3, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=5.0),
     dict(off_policy=True, last_entropy=0.0)),
    ("dr_grpo", dict(top_entropy_quantile=0.4, entropy_coef=0.05), dict(off_policy=False)),
    ("dapo", dict(top_entropy_quantile=0.5, entropy_coef=0.05), dict(off_policy=True)),
    ("cispo", dict(top_entropy_quantile=0.4, entropy_coef=0.05, beta=0.04), dict(off_policy=False)),
    ("vespo", dict(top_entropy_quantile=0.3, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=5.0),
     dict(off_policy=True, last_entropy=0.0)),
    ("vespo", dict(top_entropy_quantile=0.3, off_policy_mask_threshold=0.01), dict(off_policy=True, seed=1)),
]


@pytest.mark.parametrize("gas", [1, 2])
@pytest.mark.parametrize("loss_type,config,batch_kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_grpo_loss_and_gradient_equal_trl(tmp_path, model_path, loss_type, config, batch_kw, gas):
    compare_grpo(tmp_path, model_path, dict(batch_kw), gas=gas, loss_type=loss_type, **config)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_grpo_steps_per_generation_normalizer(tmp_path, model_path, loss_type):
    # steps_per_generation=4 > gradient_accumulation_steps=2: old log-probs come from the generation step,
    # and the num_items normalizer is rescaled by accumulation / steps_per_generation (TRL's rule).
    compare_grpo(tmp_path, model_path, dict(off_policy=True), gas=2, loss_type=loss_type, steps_per_generation=4,
                 num_iterations=2)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo", "vespo"])
def test_grpo_eval_mode_equal_trl(tmp_path, model_path, loss_type):
    # evaluation: no accumulation division, num_items not rescaled, metrics go to the eval log
    compare_grpo(tmp_path, model_path, dict(off_policy=True), gas=2, train=False, loss_type=loss_type, beta=0.04,
                 entropy_coef=0.05, steps_per_generation=4)


def test_grpo_bf16_autocast_close_to_trl(tmp_path, model_path):
    """Under bf16 autocast TRL's head rounds its logits to bf16 while gro_kernels keeps float32 statistics
    (the head's matmul still takes the activations' dtype): agreement at bf16 level, not float32 level."""
    args = grpo_config(tmp_path, loss_type="dapo", bf16=True)
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=prompts_dataset(),
                          processing_class=build_tokenizer())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = grpo_batch(trainer, off_policy=True, beta=0.0)
    ref = loss_grads_metrics(trainer, batch)
    patch_trainer(trainer)
    ours = loss_grads_metrics(trainer, batch)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=1e-5)
    for name in ref[1]:
        assert (ours[1][name] - ref[1][name]).norm() <= 2e-2 * ref[1][name].norm() + 1e-7, name


def test_grpo_tied_embeddings(tmp_path, tied_model_path):
    # the lm_head weight is the input embedding: its gradient has both contributions, as in TRL
    compare_grpo(tmp_path, tied_model_path, dict(off_policy=True), gas=2, loss_type="dapo", beta=0.04,
                 use_bias_correction_kl=False)


@pytest.mark.parametrize("loss_type,config", [("dapo", dict(beta=0.04, temperature=0.7)),
                                               ("grpo", dict(entropy_coef=0.05, cast_lm_head_to_fp32=True))])
def test_grpo_gemma_softcap_equal_trl(tmp_path, gemma_path, loss_type, config):
    # Gemma 2's final_logit_softcapping: applied by TRL's head and by ours (refused on main)
    compare_grpo(tmp_path, gemma_path, dict(off_policy=True), loss_type=loss_type, **config)


def test_grpo_sampler_logprobs(tmp_path, model_path):
    """sampler_logprobs=True: the policy's log-probs (TRL's per-token step and the loss's) are those of the
    distribution generate samples from (TRL's top_k / top_p after its temperature, transformers' own
    warpers here); TRL's loss math on them is the patched loss; the reference's stay untruncated."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from gro_kernels.integrations.hf_head import add_gro_head

    args = grpo_config(tmp_path, temperature=0.8, top_k=5, top_p=0.8, beta=0.04, use_bias_correction_kl=False,
                       loss_type="dapo")

    def build():
        trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=prompts_dataset(),
                              processing_class=build_tokenizer())
        perturb(trainer.model, scale=0.5)   # a peaked policy, so that top_p cuts
        return trainer

    trainer = build()
    batch = grpo_batch(trainer, off_policy=True, beta=0.04)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    K = batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=am).logits[:, -K - 1:-1].double() / 0.8
    flat = logits.reshape(-1, logits.shape[-1])
    kept = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(5)(None, flat.clone())).reshape(logits.shape)
    y = batch["completion_ids"][..., None]
    kept = kept.scatter(-1, y, logits.gather(-1, y))  # a target outside the kept set joins it
    want = torch.log_softmax(kept, -1).gather(-1, y)[..., 0]
    assert (torch.isinf(kept).sum(-1) > 0).all() and (torch.isfinite(kept).sum(-1) > 1).any()
    # the reference: TRL's own _compute_loss, its per-token step on our head with the truncation given by hand
    add_gro_head(trainer.model, temperature=0.8, sampler=dict(top_k=5, top_p=0.8))
    m = batch["completion_mask"].bool()
    got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, K)[0]
    torch.testing.assert_close(got[m].double(), want[m], rtol=0, atol=1e-5)
    ref = loss_grads_metrics(trainer, batch)
    # ours: a fresh trainer (the same weights), TRL's settings read by patch_trainer
    trainer = build()
    patch_trainer(trainer, sampler_logprobs=True)
    got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, K)[0]
    torch.testing.assert_close(got[m].double(), want[m], rtol=0, atol=1e-5)
    ours = loss_grads_metrics(trainer, batch)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=1e-6)
    assert_grads_close(ours[1], ref[1])


@pytest.mark.parametrize("config,match", [(dict(repetition_penalty=1.1), "repetition_penalty"),
                                          (dict(generation_kwargs={"typical_p": 0.9}), "typical_p"),
                                          (dict(top_p=0.9, min_p=0.1), "min_p and top_p")])
def test_grpo_sampler_logprobs_refuses_what_it_cannot_follow(tmp_path, model_path, config, match):
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=grpo_config(tmp_path, **config),
                          train_dataset=prompts_dataset(), processing_class=build_tokenizer())
    with pytest.raises(ValueError, match=match):
        patch_trainer(trainer, sampler_logprobs=True)


def test_grpo_every_loss_type_of_the_map_is_tested():
    assert {c[0] for c in CASES} == set(GRPO_LOSS_TYPES)


@pytest.mark.parametrize("option,value,extra", [
    ("importance_sampling_level", "sequence", {"loss_type": "sapo"}),
    ("importance_sampling_level", "sequence", {"loss_type": "cispo"}),
    ("importance_sampling_level", "sequence", {"loss_type": "vespo", "beta": 0.04}),
])
def test_grpo_unsupported_option_raises_naming_it(tmp_path, model_path, option, value, extra):
    args = grpo_config(tmp_path, **{option: value, **extra})
    with pytest.raises(ValueError, match=f"{option}=.* not supported by gro_kernels"):
        GROGRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=prompts_dataset(),
                       processing_class=build_tokenizer())


def test_grpo_vespo_with_vllm_correction_and_off_policy_mask_raises(tmp_path, model_path):
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, train_dataset=prompts_dataset(),
                          args=grpo_config(tmp_path, loss_type="vespo", off_policy_mask_threshold=0.1),
                          processing_class=build_tokenizer())
    for obj in (trainer, trainer.args):  # vLLM is not installed here: switch it on after construction
        obj.use_vllm = obj.vllm_importance_sampling_correction = True
    with pytest.raises(ValueError, match="off_policy_mask_threshold=0.1 is not supported by gro_kernels"):
        patch_trainer(trainer)


def test_grpo_per_token_logprob_step_runs_on_gro_kernels(tmp_path, model_path):
    """TRL's own `_get_per_token_logps_and_entropies` (old / ref log-probs) goes through our head, same numbers."""
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=grpo_config(tmp_path),
                          train_dataset=prompts_dataset(), processing_class=build_tokenizer())
    batch = grpo_batch(trainer, off_policy=False, beta=0.0)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    ref = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 6, compute_entropy=True)
    patch_trainer(trainer)
    calls = []
    import gro_kernels.integrations.hf_head as head
    original = head.token_logprobs
    head.token_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        ours = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 6, compute_entropy=True)
    finally:
        head.token_logprobs = original
    assert calls, "the per-token step did not go through gro_kernels"
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)


# ---- end to end: trainer.train() ---------------------------------------------------------------------

def trained(trainer):
    """Run trainer.train(): (its parameters, its log history)."""
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer.state.log_history


def assert_same_training(ref, ours, keys):
    """Parameters within 2% of one Adam step (a 1e-7 gradient difference on a near-zero gradient becomes
    a visible step) and the logged `keys` within 1e-3, run by run."""
    (ref_params, ref_log), (our_params, our_log) = ref, ours
    for name in ref_params:
        torch.testing.assert_close(our_params[name], ref_params[name], rtol=0, atol=2e-4, msg=lambda m: f"{name}: {m}")
    for r, o in zip(ref_log, our_log):
        for key in keys:
            if key in r:
                assert o[key] == pytest.approx(r[key], rel=1e-3, abs=1e-5), key


def train_params(cls, tmp_path, model_path, **config):
    args = grpo_config(tmp_path, max_steps=3, **config)
    return trained(cls(model=model_path, reward_funcs=reward_len, args=args, train_dataset=prompts_dataset(16),
                       processing_class=build_tokenizer()))


@pytest.mark.parametrize("extra", [dict(loss_type="dapo"),   # TRL's default use_bias_correction_kl=True
                                   dict(loss_type="vespo", top_entropy_quantile=0.5, entropy_coef=0.05,
                                        off_policy_mask_threshold=0.05),
                                   dict(loss_type="sapo", use_adaptive_entropy=True, entropy_coef=0.05)])
def test_grpo_train_end_to_end_matches_trl(tmp_path, model_path, extra):
    """Three optimizer steps of generation + update (accumulation 2, steps_per_generation 4, two
    iterations per generation, KL to the reference) land on TRL's own parameters and metrics."""
    config = dict(gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=2, beta=0.04, **extra)
    ref = train_params(GRPOTrainer, tmp_path / "trl", model_path, **config)
    ours = train_params(GROGRPOTrainer, tmp_path / "gro", model_path, **config)
    assert any(abs(float(e.get("loss", 0.0))) > 0 for e in ref[1])
    assert_same_training(ref, ours, ("loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm", "policy_loss",
                                     "entropy_coef", "vespo/phi_seq_mean"))


# ---- DPO and KTO -------------------------------------------------------------------------------------

def preference_dataset(n=8):
    from datasets import Dataset
    rows = [(f"{i}{i + 1}>", "abc"[: 1 + i % 3] + "d", "hg"[: 1 + i % 2]) for i in range(n)]
    return Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                              "rejected": [r[2] for r in rows]})


def unpaired_dataset(n=8):
    from datasets import Dataset
    return Dataset.from_dict({"prompt": [f"{i}{i + 1}>" for i in range(n)],
                              "completion": ["abc"[: 1 + i % 3] + "d" for i in range(n)],
                              "label": [i % 3 != 0 for i in range(n)]})


def compare_preference(trainer):
    """TRL's loss on one batch, then the patched trainer's: same loss, gradients and metrics."""
    perturb(trainer.model)  # the policy moves away from its reference: log-ratios are not 0
    if trainer.ref_model is not None:  # and the reference away from the policy (KTO's KL estimate > 0)
        perturb(trainer.ref_model, scale=0.15, seed=11)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    ref = loss_grads_metrics(trainer, batch)
    patch_trainer(trainer)
    ours = loss_grads_metrics(trainer, batch)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=1e-6)
    assert_grads_close(ours[1], ref[1])
    assert ours[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert ours[2][name] == pytest.approx(ref[2][name], rel=1e-4, abs=1e-6), name
    return ref[2]


def dpo_trainer(tmp_path, model_path, cls=None, **config):
    from trl import DPOConfig, DPOTrainer
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to=[],
                save_strategy="no", logging_steps=1, seed=0, max_length=16, learning_rate=1e-2)
    base.update(config)
    return (cls or DPOTrainer)(model=model_path, args=DPOConfig(**base), train_dataset=preference_dataset(),
                               processing_class=build_tokenizer())


DPO_CASES = [
    # (loss_type, config overrides): every TRL loss type, lists with loss_weights, f-DPO, WPO, LD-DPO
    (["sigmoid"], dict()), (["sigmoid_norm"], dict()), (["ipo"], dict()), (["apo_zero"], dict()),
    (["hinge"], dict()), (["robust"], dict(label_smoothing=0.1)), (["bco_pair"], dict()), (["sppo_hard"], dict()),
    (["aot"], dict(label_smoothing=0.1)), (["aot_unpaired"], dict()), (["apo_down"], dict()),
    (["exo_pair"], dict(label_smoothing=0.25)), (["nca_pair"], dict()), (["discopop"], dict(discopop_tau=0.5)),
    (["sft"], dict()),
    (["sigmoid", "bco_pair", "sft"], dict(loss_weights=[0.8, 0.2, 1.0])),
    (["sigmoid"], dict(label_smoothing=0.2)),   # TRL 1.16's sigmoid does not read label_smoothing
    (["sigmoid"], dict(f_divergence_type="js_divergence")),
    (["hinge", "ipo"], dict(f_divergence_type="forward_kl", loss_weights=[1.0, 0.5])),
    (["robust"], dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.25, label_smoothing=0.1)),
    (["sigmoid"], dict(use_weighting=True)),
    (["sigmoid", "bco_pair"], dict(use_weighting=True, ld_alpha=0.5)),
    (["sigmoid", "sft"], dict(ld_alpha=0.0, loss_weights=[1.0, 0.3])),
]


@pytest.mark.parametrize("loss_type,config", DPO_CASES, ids=["-".join(c[0]) + f"-{i}" for i, c in enumerate(DPO_CASES)])
def test_dpo_loss_and_gradient_equal_trl(tmp_path, model_path, loss_type, config):
    compare_preference(dpo_trainer(tmp_path, model_path, loss_type=loss_type, beta=0.3, **config))


@pytest.mark.parametrize("loss_type,config", [(["sigmoid"], dict(loss_weights=[0.5])), (["ipo", "apo_zero"], dict()),
                                              (["sigmoid"], dict(ld_alpha=0.3)), (["sigmoid"], dict(use_weighting=True))])
def test_dpo_precomputed_reference_equal_trl(tmp_path, model_path, loss_type, config):
    compare_preference(dpo_trainer(tmp_path, model_path, loss_type=loss_type, beta=0.3, precompute_ref_log_probs=True,
                                   **config))


def test_dpo_every_loss_type_of_the_map_is_tested():
    from gro_kernels.integrations.trl import DPO_LOSS_TYPES
    assert {k for c in DPO_CASES for k in c[0]} == set(DPO_LOSS_TYPES)


def test_dpo_unknown_loss_type_raises_naming_it(tmp_path, model_path):
    # a loss type TRL may add later is refused, not run as another one
    trainer = dpo_trainer(tmp_path, model_path, loss_type=["sigmoid"])
    trainer.args.loss_type = ["sigmoid", "new_type"]
    with pytest.raises(ValueError, match="loss_type=.* not supported by gro_kernels"):
        patch_trainer(trainer)


def kto_trainer(tmp_path, model_path, cls=None, **config):
    from trl import KTOConfig, KTOTrainer
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to=[],
                save_strategy="no", logging_steps=1, seed=0, max_length=16, learning_rate=1e-2)
    base.update(config)
    return (cls or KTOTrainer)(model=model_path, args=KTOConfig(**base), train_dataset=unpaired_dataset(),
                               processing_class=build_tokenizer())


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("precompute", [False, True])
def test_kto_loss_and_gradient_equal_trl(tmp_path, model_path, precompute, loss_type):
    metrics = compare_preference(kto_trainer(tmp_path, model_path, beta=0.5, desirable_weight=1.0,
                                             undesirable_weight=1.5, precompute_ref_log_probs=precompute,
                                             loss_type=loss_type))
    if not precompute and loss_type == "kto":
        assert metrics["kl"][0] > 0  # the reference point z0 is exercised


@pytest.mark.parametrize("config", [dict(), dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2],
                                                 use_weighting=True, ld_alpha=0.5)])
def test_dpo_train_end_to_end_matches_trl(tmp_path, model_path, config):
    from trl import DPOTrainer
    from gro_kernels.integrations.trl import GRODPOTrainer
    ref, ours = (trained(dpo_trainer(tmp_path / cls.__name__, model_path, cls=cls, max_steps=3,
                                     gradient_accumulation_steps=2, per_device_train_batch_size=2, **config))
                 for cls in (DPOTrainer, GRODPOTrainer))
    assert_same_training(ref, ours, ("loss", "grad_norm", "rewards/margins", "mean_token_accuracy", "logits/chosen",
                                     "entropy"))


@pytest.mark.parametrize("loss_type", ["dapo"])  # dapo's normalizer divides by the process count
def test_grpo_ddp_two_processes_match_trl(tmp_path, model_path, loss_type):
    """DDP on 2 CPU processes (gloo): TRL's normalizers divide by the process count; the patched trainer
    lands on TRL's parameters and logs the same (globally reduced) metrics."""
    from trl_fixtures import torchrun
    torchrun("trl_ddp_worker.py", model_path, tmp_path, loss_type)
    results = torch.load(tmp_path / "results.pt")
    ref, ours = ((results[k]["params"], results[k]["log"]) for k in ("GRPOTrainer", "GROGRPOTrainer"))
    assert_same_training(ref, ours, ("loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm"))


def test_kto_train_end_to_end_matches_trl(tmp_path, model_path):
    from trl import KTOTrainer
    from gro_kernels.integrations.trl import GROKTOTrainer
    ref, ours = (trained(kto_trainer(tmp_path / cls.__name__, model_path, cls=cls, max_steps=3,
                                     gradient_accumulation_steps=2, per_device_train_batch_size=2))
                 for cls in (KTOTrainer, GROKTOTrainer))
    assert_same_training(ref, ours, ("loss", "grad_norm", "kl", "rewards/chosen", "logits/chosen", "entropy"))


def test_patch_trainer_keeps_a_user_subclass(tmp_path, model_path):
    from gro_kernels.integrations.trl import _GROGRPOLoss

    class MyTrainer(GRPOTrainer):
        def my_hook(self):
            return "kept"

    trainer = MyTrainer(model=model_path, reward_funcs=reward_len, args=grpo_config(tmp_path),
                        train_dataset=prompts_dataset(), processing_class=build_tokenizer())
    assert patch_trainer(trainer) is trainer and patch_trainer(trainer) is trainer  # idempotent
    assert isinstance(trainer, MyTrainer) and isinstance(trainer, _GROGRPOLoss) and trainer.my_hook() == "kept"
    assert type(trainer).__name__ == "GROMyTrainer" and type(trainer).__mro__[1] is _GROGRPOLoss
    with pytest.raises(TypeError, match="GRPOTrainer, DPOTrainer, KTOTrainer, DistillationTrainer or GKDTrainer"):
        patch_trainer(object())


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_trainers_take_a_path_or_an_in_memory_model_with_its_reference(tmp_path, model_path, kind):
    """The README's two lines: TRL builds the reference (and the tokenizer) from the model's path, so an
    in-memory model without one fails inside TRL; with ref_model and processing_class it trains."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import DPOConfig, KTOConfig

    from gro_kernels.integrations.trl import GRODPOTrainer, GROKTOTrainer

    cls, config, data = ((GRODPOTrainer, DPOConfig, preference_dataset()) if kind == "dpo"
                         else (GROKTOTrainer, KTOConfig, unpaired_dataset()))
    args = config(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to=[],
                  save_strategy="no", logging_steps=1, max_length=16, max_steps=1)
    assert cls(model=model_path, args=args, train_dataset=data).ref_model is not None  # from the path
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    model.config._name_or_path = ""  # as a model built from a fresh config: no path to load a reference from
    with pytest.raises(OSError):
        cls(model=model, args=args, train_dataset=data, processing_class=build_tokenizer())
    trainer = cls(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=data,
                  processing_class=build_tokenizer())
    trainer.train()
    assert any("rewards/chosen" in h for h in trainer.state.log_history)


def test_dpo_gemma_softcap_equal_trl(tmp_path, gemma_path):
    # DPO on a soft-capped Gemma 2: TRL's head and ours both apply final_logit_softcapping (refused on main)
    compare_preference(dpo_trainer(tmp_path, gemma_path, loss_type=["sigmoid"], beta=0.3))
