"""The `Args:` blocks of the public functions' docstrings, written once.

`gro_loss`, `GROLoss.forward`, `gro_objective` and `token_logprobs` share most arguments; each
description lives here and `document(...)` puts the ones a function takes into its docstring,
where `{args}` stands. docs/options.md says the same at more length. Imports nothing from the
package, so every layer may use it.
"""
from __future__ import annotations

import re
import textwrap

ARGS = {
    "hidden": "[B, T, d] float. The policy's final hidden states; hidden[:, t] predicts targets[:, t] "
              "(shift by one before calling).",
    "weight": "[V, d] float. The LM head weight (model.lm_head.weight).",
    "targets": "[B, T] int. Next-token ids; ignore_index marks tokens that are not scored (prompt, padding).",
    "logp": "[B, T] float. The policy's per-token log-probs, with their gradient (e.g. token_logprobs(...).logp).",
    "method": "str, default 'gro'. The preset, one of METHODS (grpo, dapo, rloo, dpo, kto, sft, gro, ...).",
    "mask": "[B, T] bool or 0/1, optional. The tokens that count, on top of ignore_index.",
    "entropy": "[B, T] float, optional. Per-token entropies, for entropy_coef, top_entropy_quantile and the "
               "entropy metric.",
    "kl": "[B, T] float, optional. The exact per-token KL(policy || reference), for kl_estimator='full'.",
    "rewards": "[B] float, optional. Each sequence's reward (reward-scored methods).",
    "advantages": "[B] or [B, T] float, optional. Given weights (a critic's, GAE); they replace the weights "
                  "formed from rewards. Not together with rewards.",
    "group_ids": "[B] int, optional. Each sequence's group: its prompt, or its preference pair.",
    "labels": "[B] +1 / -1 (or bool), optional. Chosen / desirable (+1) or rejected / undesirable (-1).",
    "baselines": "[B] float, optional. Per-sequence baselines for anchor='baseline' (ReMax: the greedy reward).",
    "offline": "[B] bool, optional. Rows the policy did not sample (dataset answers): plain log-likelihood "
               "term, scaled by offline_coef.",
    "old_logp": "[B, T] float, optional. The behaviour (sampling) policy's log-probs; without them the batch "
                "is on-policy.",
    "ref_logp": "[B, T] float, optional. The reference policy's log-probs, for the KL and the implicit scores.",
    "ref_hidden": "[B, T, d_ref] float, optional. The frozen reference model's final hidden states. With "
                  "ref_weight: the exact KL (kl_estimator='full'), and ref_logp when not given.",
    "ref_weight": "[V, d_ref] float, optional. The reference model's LM head weight (with ref_hidden).",
    "bias": "[V] float, optional. The LM head bias. A -inf entry masks that vocabulary row (padding): every "
            "statistic and gradient is that of the head without the row (its gradients exactly 0; a target in "
            "it has logp -inf, and a loss on it is a ValueError). NaN or +inf is a ValueError.",
    "ref_bias": "[V] float, optional. The reference head's bias; -inf only on rows `bias` masks too (else "
                "the exact KL is infinite: a ValueError naming ref_bias).",
    "num_items_in_batch": "int or 0-d tensor, optional. Scored tokens in the whole accumulated batch: with "
                          "loss_agg='token_mean' gradient accumulation gives the whole batch's gradient. With "
                          "offline_role='sft' (CHORD, HPT) a pair: (online tokens, offline tokens) that train "
                          "(objective.offline.sft_token_counts).",
    "teacher_hidden": "[B, T, d_teacher] float, optional. A frozen teacher's final hidden states (its hidden "
                      "size may differ from the policy's): with teacher_weight and distill_coef (method='distill'), "
                      "the exact per-token divergence to the teacher in the same fused pass.",
    "teacher_weight": "[V, d_teacher] float, optional. The teacher's LM head weight (its vocabulary must be the "
                      "policy's), given with teacher_hidden.",
    "teacher_bias": "[V] float, optional. The teacher head's bias.",
    "distill": "[B, T] float, optional. The per-token divergence to a teacher, with its gradient (as "
               "token_logprobs(..., teacher_hidden=...).distill gives it), for distill_coef.",
    "divergence": "str, default 'reverse_kl'. With a teacher head: 'reverse_kl' KL(policy || teacher), "
                  "'forward_kl' KL(teacher || policy), or 'jsd', jsd_beta KL(teacher || m) + (1 - jsd_beta) "
                  "KL(policy || m), m = (1 - jsd_beta) policy + jsd_beta teacher.",
    "jsd_beta": "float in [0, 1], default 0.5. The generalized JSD's weight (0: forward KL, 1: reverse KL, as "
                "TRL and Liger define it).",
    "rollout_logp": "[B, T] float, optional. The sampler's (vLLM's) log-probs, for rollout_correction and "
                    "off_policy_mask_threshold.",
    "truncated": "[B] bool, optional. Completions cut at the length limit, for mask_truncated_completions.",
    "log_sum_sq_probs": "[B, T] float, optional. log sum_v p_v^2 of the policy per token, for use_weighting "
                        "(gro_loss computes it).",
    "sequence_ids": "[B, T] int, optional. The sequence each token belongs to (-1: padding), so that a row holds "
                    "several (packed rows, e.g. [1, L]); per-sequence inputs ([S]) are then indexed by sequence id. "
                    "loss_agg='seq_mean_token_sum_norm' then needs max_completion_length. A 1-D temperature / "
                    "top_k / top_p / min_p tensor is then per sequence id too.",
    "positions": "[B, T] int, optional. Each token's place in its sequence, where the order along the row (and "
                 "cp_group's rank order) is not it: a zigzag / ring-attention split.",
    "cp_group": "process group, optional. Context parallelism: each rank passes its slice of the tokens of the "
                "same sequences (per-sequence inputs the same on every rank); every rank returns the loss of the "
                "whole sequences, its backward reaches the parameters through its own tokens: sum the parameter "
                "gradients over the group (docs/options.md, Scaling out).",
    "tp_group": "process group, optional. Tensor (vocabulary) parallelism: weight (and bias, and the reference "
                "head's) is this rank's contiguous slice of the vocabulary's rows; targets are ids of the whole "
                "vocabulary. Per chunk the row statistics are combined over the group (one MAX and one packed SUM "
                "all-reduce); dW and db stay this rank's, dh is summed over the group. The head options pass "
                "through, top_k / min_p are found over the whole vocabulary, top_p is refused (docs/options.md).",
    "vocab_start": "int, optional (with tp_group). The first vocabulary row this rank holds; by default from the "
                   "group's shard sizes in rank order (shards may be uneven). The shards must tile [0, V).",
    "sequence_parallel": "bool, default False (with tp_group). The hidden states were gathered from "
                         "sequence-parallel slices by an op whose backward reduce-scatters (Megatron's "
                         "gather_from_sequence_parallel_region): dh is left as this rank's partial sum for it.",
    "ignore_index": "int, default -100. The target id of tokens that are not scored.",
    "backend": "str, default 'auto'. 'auto' (triton on CUDA tensors, else torch), 'torch' (chunked, any "
               "device), 'triton' (fused kernels), 'naive' (materializes the logits; the test reference).",
    "backend_options": "dict, optional. Options of the chunked backends: {'chunk_elements': n}, the logits "
                       "per chunk.",
    "return_entropy": "bool, optional. Compute the entropy (for the entropy metric); computed anyway when an "
                      "option needs it.",
    "return_sum_p2": "bool, default False. Also return sum_v p_v^2 per token (TokenStats.sum_p2).",
    "temperature": "float > 0, or a [B] (per sequence) / [B, T] (per token) tensor, default 1.0. The softmax "
                   "temperature: statistics come from softcap(logits) / temperature (a constant: no gradient).",
    "softcap": "float > 0, optional. The logit soft cap c: logits become c * tanh(z / c) before the temperature "
               "(Gemma 2/3's final_logit_softcapping), on both heads; a -inf logit stays -inf.",
    "top_k": "int, or a [B] / [B, T] tensor, optional. The sampler's top-k (0 or -1: off): log-probs, entropy and "
             "KL are those of the renormalized truncated distribution (docs/head.md). The kept set is a constant of "
             "the gradient; a target outside it joins its row's kept set. The reference is never truncated.",
    "top_p": "float in (0, 1], or a [B] / [B, T] tensor, optional. The sampler's top-p (1: off), as top_k; not "
             "with tp_group.",
    "min_p": "float in [0, 1], or a [B] / [B, T] tensor, optional. The sampler's min-p (0: off), as top_k.",
    "head_precision": "str, default 'native'. The head's GEMMs: 'native' (16-bit GEMMs with fp32 output), "
                      "'fp32' (every GEMM, the gradient GEMMs too, on fp32 copies of 16-bit hidden states and "
                      "weight, TF32 off: vLLM's fp32 head; the weight upcast in vocabulary slices past a 1 GiB "
                      "budget), 'tf32' (the same on TF32 tensor cores; CUDA sm_80+ only, else a ValueError).",
    "class_weight": "[V] float >= 0, optional. The SFT preset's class weights (torch's cross-entropy `weight`): "
                    "each target's log-likelihood times its class weight, the mean over the targets' weights. "
                    "Indexed by ids of the whole vocabulary (with tp_group, every rank passes all V).",
    "return_mean_logp": "bool, default False. Also return (1/V) sum_v w_v log q_v per token (TokenStats.mean_logp, "
                        "label smoothing's term; w = class_weight, else 1); not with top_k / top_p / min_p.",
    "lse": "[B, T] float, optional. The head's log normalizer per token (TokenStats.lse, differentiable), for "
           "z_loss_coef.",
    "mean_logp": "[B, T] float, optional. (1/V) sum_v w_v log p_v per token (token_logprobs(return_mean_logp=True), "
                 "differentiable), for the SFT preset's label_smoothing.",
    "target_weight": "[B, T] float >= 0, optional. Each target's class weight (class_weight[targets]), for the "
                     "SFT preset's weighted cross-entropy.",
}


def options_entry(names) -> str:
    """The `**options` entry: every option name (docs/options.md describes each)."""
    return ("Options of the objective, overriding the preset's values (docs/options.md describes each: "
            "type, default per method, where it applies): " + ", ".join(sorted(names)) + ".")


def args_block(names, extra=None, indent: str = "    ") -> str:
    """`Args:` and one wrapped entry per name, in order; `extra` adds or replaces descriptions."""
    table = {**ARGS, **(extra or {})}
    lines = [indent + "Args:"]
    for name in names:
        text = textwrap.wrap(f"{name}: {table[name]}", width=100 - len(indent) - 4,
                             subsequent_indent="    ", break_on_hyphens=False)
        lines += [indent + "    " + line for line in text]
    return "\n".join(lines)


def document(names, extra=None):
    """Decorator: put the Args block of `names` where the docstring says {args} (at that line's indent)."""
    def apply(obj):
        found = re.search(r"^( *)\{args\}$", obj.__doc__, re.M)
        obj.__doc__ = obj.__doc__[:found.start()] + args_block(names, extra, found.group(1)) + obj.__doc__[found.end():]
        return obj
    return apply
