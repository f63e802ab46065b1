"""Models whose logits are not `lm_head(hidden)`: the trainer's log-probs equal the model's own
(`log_softmax(model(...).logits)`) for Granite's `logits_scaling`, Cohere's `logit_scale` and
HyperCLOVAX's (multiplying) `logits_scaling`, Gemma 2 / 3's `final_logit_softcapping` (passed to
the loss as `softcap`); unknown head transforms are refused with an error. Tiny models built from
configs, no download."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gro_kernels.demo import CharTokenizer, make_prompts, reversal_reward  # noqa: E402
from gro_kernels.trainer import GROConfig, GROTrainer, collate  # noqa: E402

TOK = CharTokenizer()
SMALL = dict(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)


def build(config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # a larger head than the default init: logits of a realistic size
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def trainer_for(model, tmp_path):
    cfg = GROConfig(method="grpo", steps=1, num_generations=2, prompts_per_step=1, max_new_tokens=4,
                    output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False,
                    backend="torch", loss_options={"kl_coef": 0.0}, temperature=1.0)
    return GROTrainer(model, TOK, reward_funcs=[reversal_reward], train_dataset=make_prompts(4, 3, seed=0),
                      config=cfg)


def batch():
    comps = ["4321", "21", "9"]
    return collate([TOK.encode("1234>"), TOK.encode("12>"), TOK.encode("9>")],
                   [TOK.encode(c, add_special_tokens=False) + [TOK.eos_token_id] for c in comps],
                   pad_id=TOK.pad_token_id, group_ids=[0, 0, 0], rewards=[1.0, 0.0, 0.5])


def model_logp(model, b, cap=True):
    """Per-token log-probs from the model's own logits (the reference); cap=False: without its soft cap."""
    saved = model.config.final_logit_softcapping if not cap else None
    if not cap:
        model.config.final_logit_softcapping = None
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    if not cap:
        model.config.final_logit_softcapping = saved
    lp = torch.log_softmax(logits[:, b.prompt_len - 1:-1].double(), dim=-1)
    valid = b.targets != -100
    picked = lp.gather(-1, b.targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(valid, picked, torch.zeros_like(picked))


CASES = [
    ("granite divides by logits_scaling", "GraniteConfig", dict(logits_scaling=8.0)),
    ("granitemoe divides by logits_scaling", "GraniteMoeConfig", dict(logits_scaling=0.5, num_local_experts=2,
                                                                       num_experts_per_tok=1)),
    ("cohere multiplies by logit_scale", "CohereConfig", dict(logit_scale=0.25)),
    ("hyperclovax multiplies by logits_scaling", "HyperCLOVAXConfig", dict(logits_scaling=4.0)),
    ("llama: plain lm_head", "LlamaConfig", {}),
]


@pytest.mark.parametrize("name,config_cls,extra", CASES, ids=[c[0] for c in CASES])
def test_trainer_logprobs_match_the_models_own_logits(tmp_path, name, config_cls, extra):
    cls = getattr(transformers, config_cls, None)
    if cls is None:
        pytest.skip(f"transformers has no {config_cls}")
    model = build(cls, **extra)
    trainer = trainer_for(model, tmp_path)
    b = batch()
    want = model_logp(model, b)
    got = trainer.logprobs(trainer.model, b).double()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert want.min() < -1.0  # not a degenerate test: the scale matters at these logit sizes


GEMMA = [("gemma2", "Gemma2Config"), ("gemma3", "Gemma3TextConfig")]


@pytest.mark.parametrize("name,config_cls", GEMMA, ids=[g[0] for g in GEMMA])
def test_softcapped_gemma_logprobs_match_the_models_own_logits(tmp_path, name, config_cls):
    # Gemma 2 / 3 soft-cap their logits: the trainer reads final_logit_softcapping and the loss applies it
    # (main refused these models). The cap is small next to these logits, so it changes them a lot.
    cls = getattr(transformers, config_cls, None)
    if cls is None:
        pytest.skip(f"transformers has no {config_cls}")
    model = build(cls, head_dim=8, final_logit_softcapping=3.0)
    trainer = trainer_for(model, tmp_path)
    b = batch()
    want = model_logp(model, b)
    torch.testing.assert_close(trainer.logprobs(trainer.model, b).double(), want, rtol=0, atol=2e-5)
    # the loss's own log-probs (gro_loss in the trainer's forward) are the model's too
    loss, logp, _ = trainer.policy(b.input_ids, b.attention_mask, b.position_ids, b.targets, b.prompt_len,
                                   trainer._loss_kwargs(b, int((b.targets != -100).sum()), 1.0) | {"rewards": b.rewards,
                                                                                              "advantages": None})
    torch.testing.assert_close(logp.double(), want, rtol=0, atol=2e-5)
    with torch.no_grad():
        uncapped = model_logp(model, b, cap=False)
    assert (uncapped - want).abs().max() > 0.5, "the cap must matter at these logits"


def test_sampler_settings_flow_into_the_loss(tmp_path):
    # top_k / top_p / min_p of GROConfig: the trainer's log-probs are those of the truncated distribution the
    # sampler drew from (the reference's stay the full one), here against the model's own logits.
    model = build(transformers.LlamaConfig)
    cfg = GROConfig(method="grpo", steps=1, num_generations=2, prompts_per_step=1, max_new_tokens=4,
                    output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False, backend="torch",
                    loss_options={"kl_coef": 0.0}, temperature=0.7, top_k=4, top_p=0.9)
    trainer = GROTrainer(model, TOK, reward_funcs=[reversal_reward], train_dataset=make_prompts(4, 3, seed=0),
                         config=cfg)
    b = batch()
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=b.position_ids).logits[:, b.prompt_len - 1:-1].double() / 0.7
    # transformers' own warpers (top_k, then top_p) keep the set generate samples from
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    flat = logits.reshape(-1, logits.shape[-1])
    kept = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(4)(None, flat.clone())).reshape(logits.shape)
    y = b.targets.clamp(min=0)[..., None]
    kept = kept.scatter(-1, y, logits.gather(-1, y))       # a target outside the kept set joins it
    lp = torch.log_softmax(kept, -1).gather(-1, y)[..., 0]
    want = torch.where(b.targets != -100, lp, torch.zeros_like(lp))
    got = trainer.logprobs(trainer.model, b).double()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (torch.isinf(kept) & (b.targets != -100)[..., None]).sum() > 0, "the sampler must truncate here"
    kw = trainer._loss_kwargs(b, 10, 1.0)
    assert (kw["top_k"], kw["top_p"], kw["temperature"]) == (4, 0.9, 0.7)


def test_min_p_with_top_p_is_refused():
    with pytest.raises(ValueError, match="min_p with top_p"):
        GROConfig(top_p=0.9, min_p=0.05)


def test_head_precision_is_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match="head_precision"):
        GROConfig(head_precision="fp16")
    if not torch.cuda.is_available():  # tf32 needs CUDA: refused when the trainer is built, not at its first step
        cfg = GROConfig(method="grpo", steps=1, num_generations=2, prompts_per_step=1, max_new_tokens=4,
                        output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False,
                        backend="torch", loss_options={"kl_coef": 0.0}, head_precision="tf32")
        with pytest.raises(ValueError, match="tf32"):
            GROTrainer(build(transformers.LlamaConfig), TOK, reward_funcs=[reversal_reward],
                       train_dataset=make_prompts(4, 3, seed=0), config=cfg)


def test_an_unknown_head_transform_is_caught_by_the_probe(tmp_path):
    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.logits is not None:
                out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    model = Doubled(transformers.LlamaConfig(**SMALL))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    with pytest.raises(ValueError, match="not lm_head"):
        trainer_for(model, tmp_path)


@pytest.mark.parametrize("capped", ["teacher_model", "model"])
def test_distillation_from_or_to_a_softcapped_gemma_is_refused_at_construction(tmp_path, capped):
    # The divergence to a teacher head takes no soft cap: the trainer refuses it when built, naming the model
    # (a teacher's own cap never reached the loss: it was trained against an uncapped teacher without a word).
    gemma = build(transformers.Gemma2Config, head_dim=8, final_logit_softcapping=3.0)
    plain = build(transformers.LlamaConfig)
    model, teacher = (plain, gemma) if capped == "teacher_model" else (gemma, plain)
    cfg = GROConfig(method="distill", steps=1, num_generations=2, prompts_per_step=1, max_new_tokens=4,
                    output_dir=str(tmp_path), metrics_file=None, save_final=False, progress=False, backend="torch")
    with pytest.raises(ValueError, match=f"{capped} soft-caps its logits"):
        GROTrainer(model, TOK, train_dataset=make_prompts(4, 3, seed=0), config=cfg, teacher_model=teacher)
