"""`GROTrainer`: sample, score, and optimize any causal LM with `gro_loss` (any preset).

One step:

1. take this process's share of the step's prompts (a deterministic function of seed and step);
2. sample `num_generations` completions per prompt (`model.generate`), score them with the reward
   functions, and add the prompt's gold completions as offline rows of the same group (if any);
   in pure offline mode (no reward functions) take dataset rows (pairs / labelled / scored) instead;
3. under `no_grad`, compute the old log-probs (only when `num_iterations > 1`: with one update the
   ratio is exactly 1 and `gro_loss` uses `sg[logp]`) and the reference log-probs (frozen copy);
   reward-scored methods then form their weights on the whole batch of all processes
   (`batch_weights.py`), so micro-batches never change them;
4. `num_iterations` times: for each micro-batch (whole groups), run the backbone for the final
   hidden states and call `gro_loss(hidden, lm_head.weight, targets, ...)` - the full `[N, V]`
   logits are never built - backward with global normalization, then clip and step AdamW.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..logprobs import token_logprobs
from ..loss import gro_loss
from ..objective.inputs import prepare_batch, read_inputs
from ..objective.offline import sft_token_counts
from . import distributed as gdist
from .batch_weights import (batch_advantages, forms_weights_from_rewards, kto_reference_point, mismatched_pairs,
                            needs_behaviour_logp, options_beside_advantages)
from .config import GROConfig
from ..logprobs.transform import check_precision
from .heads import check_head, fold_scale, logit_scale, logit_softcap
from .offline import decode_completion, encode_completion, encode_prompt, gold_completions, offline_batch
from .packing import PackedTokens, check_packing, packed_hidden
from .rollout import IGNORE_INDEX, Batch, collate, generate, score



# ---- model plumbing -------------------------------------------------------------------------------
def pick_attn_implementation() -> str:
    """`flash_attention_2` on CUDA when flash-attn is installed, `sdpa` otherwise."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(name_or_config, *, dtype=None, **kwargs):
    """`AutoModelForCausalLM` from a hub name / path, or from a config (no download), with the best attention."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    attn = kwargs.pop("attn_implementation", None) or pick_attn_implementation()
    if isinstance(name_or_config, PretrainedConfig):
        return AutoModelForCausalLM.from_config(name_or_config, attn_implementation=attn, dtype=dtype, **kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_config, attn_implementation=attn, dtype=dtype, **kwargs)


def final_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The backbone's last hidden state (after the final norm), without computing any logits."""
    base = getattr(model, "base_model", model)
    if base is not model:
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1]


def lm_head(model):
    """(weight [V, d], bias [V] or None) of the output projection."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    return head.weight, getattr(head, "bias", None)


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def policy_inputs(model, input_ids, attention_mask, position_ids, prompt_len: int, autocast_dtype=None,
                  packed: Optional[PackedTokens] = None):
    """(hidden [N, C, d], weight, bias): the states that predict the completion tokens, and the head.
    With `packed` (`PackedTokens` of the tokens the loss reads) the rows run as one sequence without
    padding and hidden is `[1, K, d]`, the states that predict those tokens (`packing.py`)."""
    ctx = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        if packed is not None:
            hidden = packed_hidden(final_hidden, model, input_ids, attention_mask, position_ids, prompt_len, packed)
        else:
            hidden = final_hidden(model, input_ids, attention_mask, position_ids)[:, prompt_len - 1:-1]
    weight, bias = lm_head(model)
    hidden, bias = fold_scale(hidden, bias, logit_scale(model))  # Granite's logits_scaling, Cohere's logit_scale
    if hidden.dtype != weight.dtype:  # bf16 autocast: project in bf16 (the kernels accumulate in fp32)
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return hidden, weight, bias


class PolicyLoss(nn.Module):
    """The module DDP wraps: its forward runs the backbone *and* `gro_loss`.

    Both the backbone parameters and the `lm_head` weight are used inside this forward, so DDP
    synchronizes all their gradients (see `distributed.py`). `gro_loss` itself runs outside
    autocast: its backends do their own fp32 accumulation and must not see bf16-rounded logits.
    """

    def __init__(self, model: nn.Module, autocast_dtype=None, pack: bool = False):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.pack = pack

    def forward(self, input_ids, attention_mask, position_ids, targets, prompt_len: int, loss_kwargs: dict):
        packed = PackedTokens(targets != IGNORE_INDEX) if self.pack else None
        hidden, weight, bias = policy_inputs(self.model, input_ids, attention_mask, position_ids, prompt_len,
                                             self.autocast_dtype, packed=packed)
        if packed is not None:  # the packed row of scored tokens goes to the loss as it is (sequence_ids)
            targets, loss_kwargs = packed.take(targets), packed.loss_inputs(loss_kwargs)
        # return_entropy: the progress bar and metrics.jsonl report the policy's entropy.
        out = gro_loss(hidden, weight, targets, bias=bias, softcap=logit_softcap(self.model), return_entropy=True,
                       **loss_kwargs)
        logp = out.logp.detach() if packed is None else packed.put(out.logp.detach())
        return out.loss, logp, out.metrics


def no_reward(prompts, completions, **_):
    """Every completion scores 0 (pure on-policy distillation: the teacher term is the whole loss)."""
    return [0.0] * len(completions)


# ---- files ----------------------------------------------------------------------------------------
def truncate_metrics(path: str, step: int) -> None:
    """Keep only the lines of steps <= `step` (a resumed run rewrites the steps after its checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def replace_dir(src: str, dst: str) -> None:
    """Move the finished folder `src` to `dst`, replacing an older `dst` (kept until the move is done)."""
    old = dst + ".old"
    if os.path.exists(dst):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(dst, old)
    os.rename(src, dst)
    if os.path.exists(old):
        shutil.rmtree(old)


# ---- the trainer ----------------------------------------------------------------------------------
def _check_teacher_heads(cfg: GROConfig, model, teacher_model) -> None:
    """The divergence to a teacher head takes no soft cap and no sampler truncation (gro_loss refuses them):
    refused when the trainer is built, naming the model or setting, not at the first step (and a teacher's
    own cap, which gro_loss never sees, is not dropped without a word)."""
    for who, m in (("model", model), ("teacher_model", teacher_model)):
        cap = logit_softcap(m)
        if cap is not None:
            raise ValueError(f"GROTrainer: {who} soft-caps its logits (final_logit_softcapping={cap}); the divergence "
                             "to a teacher head takes no soft cap")
    truncation = cfg.sampler()
    if truncation:
        name = next(iter(truncation))
        raise ValueError(f"GROConfig.{name} truncates the sampling distribution; the divergence to a teacher head "
                         "is over the whole vocabulary and takes no truncation: leave it off with teacher_model")


class GROTrainer:
    """Train `model` (an HF causal LM) with `gro_loss`.

    Args:
        model: the policy (`AutoModelForCausalLM`); moved to this process's device.
        tokenizer: anything with `encode(text[, add_special_tokens])` and `decode(ids[, skip_special_tokens])`.
        reward_funcs: callables `(prompts, completions, **columns) -> list[float]`; `columns` are the
            dataset row's other keys, repeated per completion. None / empty: pure offline training.
        train_dataset: a list (or indexable) of dicts. Online: `{"prompt": str, ...}` (plus the gold
            column named by `config.offline_column`); offline: see `offline.py`.
        ref_model: the frozen reference; by default a copy of `model` made here when the method or
            `kl_coef` needs one (`config.use_reference`).
        teacher_model: a frozen teacher (an HF causal LM with the policy's tokenizer; its size may
            differ) for on-policy distillation (`method="distill"`, or any method with `distill_coef`):
            its final hidden states and lm_head give the per-token divergence in `gro_loss`'s fused pass.
            Without reward functions the trainer still samples, every completion scores 0, and the loss
            is the distillation term alone.
        reward_weights: one weight per reward function (default 1).
    """

    def __init__(self, model, tokenizer, *, reward_funcs: Optional[Sequence[Callable]] = None, train_dataset=None,
                 config: Optional[GROConfig] = None, ref_model=None, teacher_model=None, reward_weights=None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None):
        self.config = cfg = config or GROConfig()
        self.dist = gdist.info()
        self.device = self.dist.device if self.dist.device.type == "cuda" else next(model.parameters()).device
        self.model = model.to(self.device)
        check_head(self.model, final_hidden, lm_head)  # log-probs from hidden states must be the model's own
        self.tokenizer = tokenizer
        self.reward_funcs = list(reward_funcs or [])
        self.options = cfg.resolved_options()  # validates method and loss_options now, not at the first step
        self.teacher_model = teacher_model
        if (teacher_model is not None) != (self.options.distill_coef != 0):
            raise ValueError("teacher_model and distill_coef go together (method='distill' sets distill_coef=1): got "
                             f"teacher_model {'given' if teacher_model is not None else 'None'}, distill_coef="
                             f"{self.options.distill_coef}")
        if teacher_model is not None:
            self.teacher_model = teacher_model.to(self.device).eval().requires_grad_(False)
            check_head(self.teacher_model, final_hidden, lm_head)
            _check_teacher_heads(cfg, self.model, self.teacher_model)
            if not self.reward_funcs:  # pure on-policy distillation: sample, no reward
                self.reward_funcs = [no_reward]
        self.reward_weights = reward_weights
        self.dataset = train_dataset
        self.online = bool(self.reward_funcs)
        if self.dataset is None or len(self.dataset) == 0:
            raise ValueError("train_dataset must be a non-empty list of dict rows")
        if cfg.prompts_per_step % self.dist.world_size:
            raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                             f"processes ({self.dist.world_size})")
        cfg.check_for(online=self.online, world_size=self.dist.world_size)
        check_precision(cfg.head_precision, self.device, next(model.parameters()).dtype)  # tf32 needs CUDA

        self.eos_ids = self._eos_ids(eos_token_id)
        self.pad_id = self._pad_id(pad_token_id)

        mp = cfg.mixed_precision
        use_bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        self.ref_model = ref_model
        if self.ref_model is None and cfg.needs_reference():
            self.ref_model = copy.deepcopy(model)
        if self.ref_model is not None:
            self.ref_model.to(self.device).eval().requires_grad_(False)
            if ref_model is not None:
                check_head(self.ref_model, final_hidden, lm_head)

        torch.manual_seed(cfg.seed + 1000 * self.dist.rank)  # sampling stream; model init is the caller's
        random.seed(cfg.seed + 1000 * self.dist.rank)
        np.random.seed((cfg.seed + 1000 * self.dist.rank) % 2**32)

        if cfg.gradient_checkpointing:  # keep only each layer's input; the loss keeps only the final states
            enable_checkpointing(self.model)
        if cfg.pack_sequences:
            probed = [self.ref_model] if ref_model is not None else []
            for m in [self.model] + probed + ([self.teacher_model] if teacher_model is not None else []):
                check_packing(m, final_hidden)
        self.policy = PolicyLoss(self.model, self.autocast_dtype, pack=cfg.pack_sequences)
        self.wrapped = (gdist.wrap_fsdp(self.policy, self.model) if cfg.fsdp
                        else gdist.wrap_ddp(self.policy, self.device))
        self.fsdp = gdist.is_fsdp(self.wrapped)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay)
        warm = max(0, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.step = 0
        self._updating = False
        self._z0 = None  # KTO's reference point of the current step (method='kto' without anchor_value)
        self.history: List[dict] = []

    # -- token ids --------------------------------------------------------------------------------
    def _eos_ids(self, eos_token_id) -> List[int]:
        cands = [eos_token_id, getattr(self.tokenizer, "eos_token_id", None),
                 getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
                 getattr(self.model.config, "eos_token_id", None)]
        for c in cands:
            if c is not None:
                return [int(x) for x in (c if isinstance(c, (list, tuple)) else [c])]
        raise ValueError("no EOS token id: pass eos_token_id or use a tokenizer/model config that has one")

    def _pad_id(self, pad_token_id) -> int:
        for c in (pad_token_id, getattr(self.tokenizer, "pad_token_id", None),
                  getattr(self.model.config, "pad_token_id", None)):
            if c is not None:
                return int(c)
        return self.eos_ids[0]

    # -- data -------------------------------------------------------------------------------------
    def rows_for_step(self, step: int) -> List[dict]:
        """This process's dataset rows for `step`: a seeded permutation per epoch, sliced by step and rank."""
        n, per = len(self.dataset), self.config.prompts_per_step
        local = per // self.dist.world_size
        start = step * per + self.dist.rank * local
        rows, perms = [], {}
        for pos in range(start, start + local):
            epoch = pos // n
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
                perms[epoch] = torch.randperm(n, generator=g).tolist()
            rows.append(self.dataset[perms[epoch][pos % n]])
        return rows

    def make_batch(self, step: int) -> Batch:
        rows = self.rows_for_step(step)
        if not self.online:
            return offline_batch(rows, self.tokenizer, eos_id=self.eos_ids[0], pad_id=self.pad_id, device=self.device)
        with self.gathered():
            return self.rollout(rows)

    @contextlib.contextmanager
    def gathered(self):
        """Under FSDP, the root group's parameters (embeddings, lm_head) gathered for a pass outside the
        wrapped forward (sampling, no-grad log-probs); the decoder layers gather themselves."""
        if not self.fsdp:
            yield
            return
        self.wrapped.unshard()
        try:
            yield
        finally:
            self.wrapped.reshard()

    def _decode(self, ids: Sequence[int]) -> str:
        return decode_completion(self.tokenizer, [t for t in ids if t not in self.eos_ids])

    def _columns(self, rows: Sequence[dict]) -> dict:
        keys = [k for k in rows[0] if k != "prompt"] if rows else []
        return {k: [r.get(k) for r in rows] for k in keys}

    @torch.no_grad()
    def rollout(self, rows: Sequence[dict]) -> Batch:
        """Sample, score and lay out one group per row (online samples first, then its gold rows)."""
        cfg, K = self.config, self.config.num_generations
        prompts = [r["prompt"] for r in rows]
        pids = [encode_prompt(self.tokenizer, p) for p in prompts]
        comps = generate(self.model, pids, num_generations=K, max_new_tokens=cfg.max_new_tokens,
                         pad_id=self.pad_id, eos_ids=self.eos_ids, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p)
        texts = [self._decode(c) for c in comps]
        rep = [r for r in rows for _ in range(K)]
        rewards = score(self.reward_funcs, [r["prompt"] for r in rep], texts, self._columns(rep), self.reward_weights)

        baselines = None
        if cfg.method == "remax":  # ReMax: the greedy completion's reward is the baseline
            greedy = generate(self.model, pids, num_generations=1, max_new_tokens=cfg.max_new_tokens,
                              pad_id=self.pad_id, eos_ids=self.eos_ids, do_sample=False)
            g_r = score(self.reward_funcs, prompts, [self._decode(c) for c in greedy], self._columns(rows),
                        self.reward_weights)
            baselines = g_r.repeat_interleave(K)

        # offline gold rows of each group
        gold_rows, gold_texts, gold_group = [], [], []
        for gi, r in enumerate(rows):
            for text in gold_completions(r, cfg.offline_column, cfg.offline_per_group):
                gold_rows.append(r)
                gold_texts.append(text)
                gold_group.append(gi)
        if gold_rows and cfg.offline_reward is None:
            gold_r = score(self.reward_funcs, [r["prompt"] for r in gold_rows], gold_texts,
                           self._columns(gold_rows), self.reward_weights)
        else:
            gold_r = torch.full((len(gold_rows),), float(cfg.offline_reward or 0.0))

        P, C, G, OFF, R, B, PR, CT = [], [], [], [], [], [], [], []
        for gi in range(len(rows)):
            for k in range(gi * K, (gi + 1) * K):
                P.append(pids[gi]); C.append(comps[k]); G.append(gi); OFF.append(False); R.append(float(rewards[k]))
                B.append(float(baselines[k]) if baselines is not None else 0.0); PR.append(prompts[gi]); CT.append(texts[k])
            for j, g in enumerate(gold_group):
                if g == gi:
                    P.append(pids[gi]); C.append(encode_completion(self.tokenizer, gold_texts[j], self.eos_ids[0]))
                    G.append(gi); OFF.append(True); R.append(float(gold_r[j])); PR.append(prompts[gi]); CT.append(gold_texts[j])
                    B.append(float(baselines[gi * K]) if baselines is not None else 0.0)
        return collate(P, C, pad_id=self.pad_id, group_ids=G, offline=OFF, rewards=R,
                       baselines=B if baselines is not None else None, prompts=PR, completions=CT,
                       device=self.device)

    # -- log-probs --------------------------------------------------------------------------------
    def micro_batches(self, batch: Batch) -> List[List[int]]:
        """Row numbers of each micro-batch: `micro_batch_size` rows in order when the weights are formed
        on the whole batch first (reward-scored methods), else whole groups (pairs) packed up to it."""
        size = self.config.micro_batch_size
        if forms_weights_from_rewards(self.options):
            return [list(range(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]
        out, cur = [], []
        for g in batch.group_slices():
            if cur and len(cur) + len(g) > size:
                out.append(cur)
                cur = []
            cur = cur + g
        if cur:
            out.append(cur)
        return out

    @torch.no_grad()
    def logprobs(self, model, batch: Batch) -> torch.Tensor:
        """`[N, C]` float32 log-probs of the completion tokens under `model` (no grad, by micro-batch):
        the policy's of the sampler's (truncated) distribution, the reference's of its full one."""
        out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=self.device)
        head = self._head_options(model)
        with self.gathered() if model is self.model else contextlib.nullcontext():
            self._logprobs_into(out, model, batch, head)
        return out

    def _head_options(self, model) -> dict:
        """token_logprobs' head arguments for `model`: its soft cap, the configured precision and temperature,
        and for the policy the sampler's truncation."""
        cfg = self.config
        head = dict(temperature=float(self.options.temperature), softcap=logit_softcap(model),
                    head_precision=cfg.head_precision)
        return {**head, **cfg.sampler()} if model is self.model else head

    def _logprobs_into(self, out, model, batch: Batch, head: dict) -> None:
        for idx in self.micro_batches(batch):
            mb = batch.select(idx)
            packed = self._packed(mb)
            h, w, b = policy_inputs(model, mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len,
                                    self.autocast_dtype, packed=packed)
            targets = mb.targets if packed is None else packed.take(mb.targets)
            lp = token_logprobs(h, w, targets, bias=b, backend=self.config.backend, **head).logp
            lp = lp if packed is None else packed.put(lp)
            out[torch.as_tensor(idx, device=self.device)] = lp.float()

    def _packed(self, mb: Batch) -> Optional[PackedTokens]:
        """With `pack_sequences`, the tokens the loss reads (the packed row holds their states only)."""
        return PackedTokens(mb.targets != IGNORE_INDEX) if self.config.pack_sequences else None

    # -- the update -------------------------------------------------------------------------------
    def _loss_options(self) -> dict:
        """The objective's options as given to `gro_loss` (the sampling temperature unless overridden)."""
        return {"temperature": self.config.temperature, **self.config.loss_options}

    def _estimates_kto_z0(self) -> bool:
        """method='kto' without a fixed anchor_value: z0 is estimated per step, as TRL does."""
        return self.config.method == "kto" and "anchor_value" not in self.config.loss_options

    def _kto_z0(self, batch: Batch) -> float:
        """KTO's reference point for this step's batch, before its updates (batch_weights.py)."""
        pairs = mismatched_pairs(batch)
        return kto_reference_point(self.logprobs(self.model, pairs), self.logprobs(self.ref_model, pairs))

    def _loss_kwargs(self, mb: Batch, tokens_global: int, scale: float) -> dict:
        """gro_loss's arguments for micro-batch `mb`, whose loss the update multiplies by `scale`."""
        cfg, opts = self.config, self.options
        options = self._loss_options()
        if mb.advantages is not None:  # formed on the whole batch (batch_weights.py), with the options that shape them
            options = options_beside_advantages(options, opts)
        if opts.entropy_agg == "token_mean" and opts.entropy_coef != 0:
            # TRL's bonus: the entropy's mean over the tokens of the batch (all micro-batches and processes).
            if opts.loss_agg == "token_mean":  # the loss's own c = m / tokens_global is that mean
                options.pop("entropy_agg")
            else:  # the call's token mean, rescaled to its share of the batch's
                tokens = float(self._counted(mb).sum())
                options["entropy_coef"] = opts.entropy_coef * tokens * self.dist.world_size / (max(tokens_global, 1) * scale)
        kw = dict(method=cfg.method, backend=cfg.backend, group_ids=mb.group_ids, head_precision=cfg.head_precision,
                  **cfg.sampler(), **options)
        mu = cfg.mu_at(self.step)
        if mu is not None:  # CHORD's schedule
            kw["mu"] = mu
        if self._z0 is not None:
            kw["anchor_value"] = self._z0
        if mb.advantages is not None:
            kw["advantages"] = mb.advantages
        else:
            if opts.score in ("reward", "token_return"):
                kw["rewards"] = mb.rewards
            if opts.separation == "label":
                kw["labels"] = mb.labels
            if mb.baselines is not None and opts.anchor == "baseline":
                kw["baselines"] = mb.baselines
        if mb.offline.any():
            kw["offline"] = mb.offline
        if mb.truncated is not None:
            kw["truncated"] = mb.truncated
        if mb.old_logp is not None:
            kw["old_logp"] = mb.old_logp
        full_kl = opts.kl_estimator == "full" and opts.kl_coef != 0 and self.ref_model is not None
        # the reference's and the teacher's packed rows, found once for both (the policy's: PolicyLoss)
        packed = self._packed(mb) if full_kl or self.teacher_model is not None else None
        if full_kl:
            if logit_softcap(self.ref_model) != logit_softcap(self.model):
                raise ValueError("kl_estimator='full' soft-caps both heads with the policy's cap: the reference "
                                 f"model's final_logit_softcapping ({logit_softcap(self.ref_model)}) differs")
            with torch.no_grad():
                rh, rw, rb = policy_inputs(self.ref_model, mb.input_ids, mb.attention_mask, mb.position_ids,
                                           mb.prompt_len, self.autocast_dtype, packed=packed)
            kw.update(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
        elif mb.ref_logp is not None:
            kw["ref_logp"] = mb.ref_logp
        if self.teacher_model is not None:
            with torch.no_grad():
                th, tw, tb = policy_inputs(self.teacher_model, mb.input_ids, mb.attention_mask, mb.position_ids,
                                           mb.prompt_len, self.autocast_dtype, packed=packed)
            kw.update(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
        if opts.loss_agg == "token_mean":
            kw["num_items_in_batch"] = tokens_global
        if opts.loss_agg == "seq_mean_token_sum_norm" and opts.max_completion_length is None:
            # the same normalizer on every micro-batch and process (the default, T, varies with padding)
            kw["max_completion_length"] = cfg.max_new_tokens
        return read_inputs(cfg.method, kw)  # group ids, offline flags, old_logp only where the method reads them

    def _sft_counts(self, batch: Batch) -> tuple:
        """offline_role='sft': this process's (online RL, offline SFT) token counts (objective.offline); else ()."""
        if self.options.offline_role != "sft":
            return ()
        mask = self._counted(batch)
        b = prepare_batch(torch.zeros(mask.shape, device=self.device), mask=mask, entropy=None, kl=None,
                          rewards=batch.rewards, advantages=None, group_ids=batch.group_ids, labels=None,
                          baselines=None, offline=batch.offline, old_logp=None, ref_logp=None, num_items_in_batch=None)
        return sft_token_counts(self.options, b)

    def _truncated(self, batch: Batch) -> torch.Tensor:
        """[N] bool: sampled completions cut at max_new_tokens, i.e. not ending in an EOS (TRL's
        mask_truncated_completions); offline rows end in EOS."""
        lengths = (batch.targets != IGNORE_INDEX).sum(1)
        last = batch.targets.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
        ends = torch.isin(last, torch.as_tensor(self.eos_ids, device=last.device))
        return (lengths == 0) | ~ends

    @staticmethod
    def _counted(batch: Batch) -> torch.Tensor:
        """[N, C] bool: the tokens the loss counts (truncated completions dropped when asked)."""
        counted = batch.targets != IGNORE_INDEX
        return counted if batch.truncated is None else counted & ~batch.truncated[:, None]

    def train_step(self, batch: Batch) -> Dict[str, float]:
        """`num_iterations` optimizer steps on `batch` (this process's rows of the global batch)."""
        cfg, W = self.config, self.dist.world_size
        batch = batch.to(self.device)
        if self.options.mask_truncated_completions:
            batch.truncated = self._truncated(batch)
        counts = torch.tensor([len(batch), float(self._counted(batch).sum()), *self._sft_counts(batch)],
                              dtype=torch.float64, device=self.device)
        gdist.all_reduce(counts)
        rows_global, tokens_global = int(counts[0]), int(counts[1])
        if self.options.offline_role == "sft":  # two token means: (online RL tokens, offline SFT tokens)
            tokens_global = (float(counts[2]), float(counts[3]))
        token_mean = self.options.loss_agg == "token_mean"

        if cfg.num_iterations > 1:
            batch.old_logp = self.logprobs(self.model, batch)
        if self.ref_model is not None and not (self.options.kl_estimator == "full" and self.options.kl_coef != 0):
            batch.ref_logp = self.logprobs(self.ref_model, batch)
        self._z0 = self._kto_z0(batch) if self._estimates_kto_z0() else None
        if forms_weights_from_rewards(self.options):
            behaviour = batch.old_logp
            if behaviour is None and needs_behaviour_logp(self.options):
                behaviour = self.logprobs(self.model, batch)  # a KL in the reward: at the sampling policy
            batch.advantages = batch_advantages(cfg.method, self._loss_options(), batch, behaviour)

        micro = self.micro_batches(batch)
        ddp = not self.fsdp and self.wrapped is not self.policy
        sums: Dict[str, float] = {}
        mask = batch.targets != IGNORE_INDEX
        logp_all = torch.zeros(batch.targets.shape, dtype=torch.float32, device=self.device)
        self.model.train()
        grad_norm = torch.zeros(())
        loss_total = 0.0
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for j, idx in enumerate(micro):
                mb = batch.select(idx)
                scale = W if token_mean else W * len(mb) / rows_global
                kw = self._loss_kwargs(mb, tokens_global, scale)
                last = j == len(micro) - 1
                sync = contextlib.nullcontext() if (not ddp or last) else self.wrapped.no_sync()
                if self.fsdp:  # reduce-scatter after the last micro-batch; keep lm_head gathered until then
                    self.wrapped.set_requires_gradient_sync(last)
                    self.wrapped.set_reshard_after_backward(last, recurse=False)
                with sync:
                    loss, logp, metrics = self.wrapped(mb.input_ids, mb.attention_mask, mb.position_ids,
                                                       mb.targets, mb.prompt_len, kw)
                    (loss * scale).backward()
                if it == 0:
                    logp_all[torch.as_tensor(idx, device=self.device)] = logp.float()
                    for k, v in metrics.items():  # every gro_loss metric is a 0-d tensor
                        sums[k] = sums.get(k, 0.0) + float(v) * len(mb)
                if it == cfg.num_iterations - 1:
                    loss_total += float(loss.detach()) * scale / W
            params = [p for p in self.model.parameters() if p.grad is not None]
            if params:  # max_norm=inf: the norm only (also of FSDP's sharded gradients)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            self._updating = True  # the weights now differ from checkpoint-{step} until step += 1
            self.optimizer.step()
            self.scheduler.step()
        self.step += 1
        self._updating = False
        metrics = self._metrics(batch, mask, logp_all, sums, loss_total, float(grad_norm))
        if self._z0 is not None:
            metrics["kto_z0"] = self._z0
        return metrics

    def _metrics(self, batch, mask, logp, sums, loss_total, grad_norm) -> Dict[str, float]:
        """Global (all-process) step metrics."""
        on = ~batch.offline
        r = batch.rewards if batch.rewards is not None else torch.zeros(len(batch), device=self.device)
        r = r.to(self.device).float()
        lengths = mask.sum(1).float()
        vals = {
            "reward": ((r * on).sum(), on.sum()),
            "reward_sq": ((r * r * on).sum(), on.sum()),
            "offline_reward": ((r * ~on).sum(), (~on).sum()),
            "completion_length": ((lengths * on).sum(), on.sum()),
            "loss": (torch.tensor(loss_total), torch.tensor(1.0 / self.dist.world_size)),
        }
        if batch.ref_logp is not None:  # k3 estimate of KL(pi || ref) on the sampled tokens, before the update
            d = (batch.ref_logp - logp).masked_fill(~mask, 0.0)
            k3 = (torch.exp(d) - d - 1).masked_fill(~mask, 0.0)
            vals["kl"] = (k3.sum(), mask.sum())
        for k, v in sums.items():
            key = k if k not in vals else f"loss_{k}"
            vals[key] = (torch.tensor(v), torch.tensor(float(len(batch))))
        keys = sorted(vals)
        t = torch.tensor([[float(vals[k][0]), float(vals[k][1])] for k in keys], dtype=torch.float64, device=self.device)
        gdist.all_reduce(t)
        out = {k: (float(t[i, 0] / t[i, 1]) if t[i, 1] > 0 else float("nan")) for i, k in enumerate(keys)}
        out["reward_std"] = float(max(out.pop("reward_sq") - out["reward"] ** 2, 0.0) ** 0.5)
        out["grad_norm"] = grad_norm
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["step"] = self.step
        return out

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, callback: Optional[Callable[["GROTrainer", dict], None]] = None) -> List[dict]:
        """Run until `config.steps`; returns the per-step metrics (also in `output_dir/metrics.jsonl`).

        Resuming (after `load_checkpoint`) drops the metrics lines of steps after the checkpoint, so the
        file never repeats a step. Ctrl-C (KeyboardInterrupt) keeps every finished step's metrics and,
        in a single process with `save_on_interrupt`, saves a checkpoint of the last finished step
        before re-raising.
        """
        from tqdm.auto import tqdm

        cfg, main = self.config, self.dist.is_main
        metrics_path = (os.path.join(cfg.output_dir, cfg.metrics_file)
                        if cfg.metrics_file and main else None)
        if metrics_path:
            os.makedirs(cfg.output_dir, exist_ok=True)
            truncate_metrics(metrics_path, self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.run_name or cfg.method, disable=not (cfg.progress and main),
                   dynamic_ncols=True, leave=True)
        t_start = time.time()
        try:
            while self.step < cfg.steps:
                batch = self.make_batch(self.step)
                m = self.train_step(batch)
                m["time"] = time.time() - t_start
                self.history.append(m)
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(m) + "\n")
                post = {"reward": f"{m['reward']:.3f}"}
                for k, name in (("kl", "kl"), ("entropy", "ent")):
                    if k in m and m[k] == m[k]:
                        post[name] = f"{m[k]:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if callback is not None:
                    callback(self, m)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            # A checkpoint only of a finished step (never of half-applied updates), and only alone:
            # the other processes of a group would not reach save_checkpoint's barrier.
            if cfg.save_on_interrupt and not self._updating and self.dist.world_size == 1 and self.step > 0:
                path = self.save_checkpoint()
                print(f"interrupted: saved {path}", flush=True)
            raise
        bar.close()
        if cfg.save_final:
            self.save_checkpoint()
        return self.history

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """`save_pretrained` weights + optimizer/scheduler/step (+ each process's RNG state)."""
        path = os.path.normpath(path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}"))
        # Atomic: everything goes to a temporary folder that is renamed into place when complete, so
        # an interrupted save never leaves a half-written checkpoint under the final name.
        tmp = path + ".tmp"
        if self.dist.is_main and os.path.exists(tmp):
            shutil.rmtree(tmp)
        gdist.barrier()
        os.makedirs(tmp, exist_ok=True)
        model_state, optim_state = self._full_state()  # collective under FSDP: every process calls it
        if self.dist.is_main:
            self.model.save_pretrained(tmp, state_dict=model_state)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
            torch.save({"step": self.step, "optimizer": optim_state,
                        "scheduler": self.scheduler.state_dict(), "config": self.config.to_dict(),
                        "world_size": self.dist.world_size}, os.path.join(tmp, "trainer_state.pt"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(tmp, f"rng_state_{self.dist.rank}.pt"))
        gdist.barrier()
        if self.dist.is_main:
            replace_dir(tmp, path)
        gdist.barrier()
        return path

    def _full_state(self):
        """(model state dict or None for the model's own, optimizer state dict), unsharded under FSDP."""
        if not self.fsdp:
            return None, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.optimizer, options=opts))

    def load_checkpoint(self, path: str) -> None:
        """Resume from `save_checkpoint`'s folder: policy weights, optimizer, scheduler, step, RNG.

        The reference policy is not in the checkpoint: build the trainer from the same initial model
        (so its frozen copy is the original reference), then call this.
        """
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(self.model.parameters()).dtype)
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location=self.device, weights_only=False)
        if self.fsdp:  # full state dicts in, each process keeps its shards
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, saved.state_dict(), options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(saved.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        del saved
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rng_file = os.path.join(path, f"rng_state_{self.dist.rank}.pt")
        if os.path.exists(rng_file):
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
