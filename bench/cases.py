"""Benchmark cases: what is computed, at which shapes, on which inputs.

A *case* is one loss (GRPO, DAPO, DPO, log-prob + entropy, SFT cross-entropy) computed from
`hidden[B,T,d]` and `weight[V,d]`; every implementation in `impls.py` computes the same loss from
the same inputs, so rows of one (case, shape) compare. A *shape* is (tokens, hidden, vocab,
seq_len, dtype); `batch = tokens // seq_len` sequences of `seq_len` tokens.

Inputs are drawn fresh from a seeded generator on the target device (never zeros):
- hidden ~ N(0, 1) and weight ~ N(0, (2.5/sqrt(d))^2), so the logits have std 2.5 (peaked,
  not flat: the entropy is well below log V, as in a trained model);
- targets uniform in [0, V); completion lengths uniform in [T/2, T] (mask);
- rewards in {0, 1} with both values in every group (no zero-variance group), advantages
  `(r - mean_g) / (std_g + 1e-4)` (docs/objective.md: Bessel std, std_eps 1e-4);
- `old_logp` = the policy's own log-probs (float32, computed once, no grad) + N(0, 0.1^2) noise,
  so the PPO ratio is near 1 and some tokens clip, as in a real off-policy step;
  `ref_logp` = old_logp + another N(0, 0.1^2) (GRPO's k3 KL);
- DPO: rows [0, P) are the chosen answers, rows [P, 2P) the rejected ones (pair i = rows i and
  i+P, sharing group id i), plus a frozen reference head (`ref_hidden`, `ref_weight`, close to
  the policy's) from which every implementation computes the reference log-probs (Liger's DPO
  API takes the reference head, not reference log-probs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    entropy: bool = False  # the loss uses the entropy too
    ignore_targets: bool = False  # masked positions carry ignore_index in `targets`
    pairs: bool = False  # DPO layout
    options: tuple = ()  # (key, value) pairs of loss options, see impls.case_loss


CASES: Dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "grpo",
            "GRPO loss (clip 0.2/0.2, k3 KL 0.04 to ref_logp, seq-mean-token-mean)",
            options=(("eps_low", 0.2), ("eps_high", 0.2), ("kl_coef", 0.04), ("agg", "seq_mean_token_mean")),
        ),
        Case(
            "grpo_ent",
            "GRPO loss + entropy bonus 0.01 (clip 0.2/0.2, k3 KL 0.04, seq-mean-token-mean)",
            entropy=True,
            options=(("eps_low", 0.2), ("eps_high", 0.2), ("kl_coef", 0.04), ("agg", "seq_mean_token_mean"),
                     ("entropy_coef", 0.01)),
        ),
        Case(
            "dapo",
            "DAPO loss (clip 0.2/0.28, no KL, token-mean)",
            options=(("eps_low", 0.2), ("eps_high", 0.28), ("kl_coef", 0.0), ("agg", "token_mean")),
        ),
        Case("dpo", "DPO sigmoid loss (beta 0.1, reference head frozen)", ignore_targets=True, pairs=True,
             options=(("beta", 0.1),)),
        Case(
            "logprob_entropy",
            "log-prob + entropy, fwd+bwd of -mean(A*logp + 0.01*H) with per-token A",
            entropy=True,
        ),
        Case("sft", "SFT cross-entropy (token mean over non-ignored targets)", ignore_targets=True),
    ]
}


# ----------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int
    seq_len: int
    dtype: str = "float32"

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops(self) -> float:
        """Effective FLOPs of one fwd+bwd: 8*N*d*V (fwd matmul, recomputed matmul in the backward,
        dH and dW). Every row is normalized by this same count, including the materialized plain
        path that really does 6*N*d*V, so rows of one shape compare by time alone."""
        return 8.0 * self.tokens * self.hidden * self.vocab

    def key(self) -> str:
        return f"N{self.tokens}_d{self.hidden}_V{self.vocab}_T{self.seq_len}_{self.dtype}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch"] = self.batch
        return d


@dataclass
class Plan:
    """One (case, shapes, implementations) group: what a worker process runs."""

    case: str
    shapes: List[Shape]
    impls: List[str]
    note: str = ""
    skip: Dict[str, str] = field(default_factory=dict)  # impl -> reason it is not run in this suite


ALL_IMPLS = [
    "plain", "torch_compile", "liger", "cce", "cce_compile", "torch_lce",
    "gro_torch", "gro_triton", "gro_loss_torch", "gro_loss_triton",
]
CASE_IMPLS = {
    "grpo": ["plain", "torch_compile", "liger", "cce", "cce_compile", "gro_torch", "gro_triton",
             "gro_loss_torch", "gro_loss_triton"],
    "grpo_ent": ["matmul3", "matmul3_rows", "plain", "torch_compile", "gro_torch", "gro_triton", "gro_loss_torch",
                 "gro_loss_triton"],
    "dapo": ["plain", "torch_compile", "liger", "cce", "cce_compile", "gro_torch", "gro_triton",
             "gro_loss_torch", "gro_loss_triton"],
    "dpo": ["plain", "torch_compile", "liger", "cce", "gro_torch", "gro_triton", "gro_loss_torch",
            "gro_loss_triton"],
    "logprob_entropy": ["matmul3", "plain", "torch_compile", "liger", "cce", "gro_torch", "gro_triton"],
    "sft": ["plain", "torch_compile", "liger", "cce", "cce_compile", "torch_lce", "gro_torch", "gro_triton",
            "gro_loss_torch", "gro_loss_triton"],
}

CPU_COMPILE_NOTE = ("excluded from --quick: torch.compile costs ~30 s per case on this 2-core CPU; "
                    "run `python bench/run.py --case {case} --impls {impl}` to include it")


def quick_plans() -> List[Plan]:
    """CPU set that finishes in a few minutes on 2 shared cores (float32; triton/CUDA rows are
    skipped with their reason). The foundation target is its own suite (`--foundation`): at
    N=2048, d=512, V=32768 one plain fwd+bwd alone takes ~10 s on this machine."""
    d, v, t = 256, 8192, 128
    sweep = [Shape(n, d, v, t) for n in (256, 512, 1024)]
    one = [Shape(512, d, v, t)]
    return [
        Plan("dapo", sweep, ["plain", "torch_compile", "liger", "cce", "gro_torch", "gro_triton",
                             "gro_loss_torch", "gro_loss_triton"],
             skip={"cce_compile": CPU_COMPILE_NOTE.format(case="dapo", impl="cce_compile")}),
        Plan("logprob_entropy", sweep, ["matmul3", "plain", "cce", "gro_torch", "gro_triton"],
             skip={"torch_compile": CPU_COMPILE_NOTE.format(case="logprob_entropy", impl="torch_compile"),
                   "liger": "excluded from --quick to keep it short: here Liger GRPO computes log-probs only "
                            "(no entropy); its CPU rows are in dapo/grpo. Run --case logprob_entropy --impls liger"}),
        Plan("grpo", one, ["plain", "liger", "cce", "gro_torch", "gro_loss_torch"],
             skip={i: CPU_COMPILE_NOTE.format(case="grpo", impl=i) for i in ("torch_compile", "cce_compile")}),
        Plan("dpo", one, ["plain", "liger", "gro_torch", "gro_loss_torch"],
             skip={"torch_compile": CPU_COMPILE_NOTE.format(case="dpo", impl="torch_compile")}),
        Plan("sft", one, ["plain", "liger", "cce", "cce_compile", "torch_lce", "gro_torch", "gro_loss_torch"],
             skip={"torch_compile": CPU_COMPILE_NOTE.format(case="sft", impl="torch_compile")}),
    ]


FOUNDATION = Shape(2048, 512, 32768, 512, "float32")


def foundation_plan() -> List[Plan]:
    """The CPU targets at tokens 2048, hidden 512, vocab 32768, fp32: DAPO fwd+bwd at most 0.9x
    plain's time and 10% of plain's memory above the inputs and their gradients (the one-pass
    issue); GRPO with an entropy bonus and DPO (four GEMMs) reported at the same shape."""
    impls = ["matmul3", "plain", "gro_torch", "gro_loss_torch"]
    return [Plan("dapo", [FOUNDATION], impls[1:],
                 note="one-pass target (CPU): time <= 0.9x plain, extra memory <= 10% of plain"),
            Plan("grpo_ent", [FOUNDATION], ["matmul3", "matmul3_rows"] + impls[1:],
                 note="GRPO + entropy bonus, one pass"),
            Plan("dpo", [FOUNDATION], impls[1:], note="DPO: a forward-only pass, then the pass (four GEMMs)")]


# GPU shapes from the peers' own benchmarks, plus the Qwen-like vocabulary of the triton target.
QWEN_D, QWEN_V = 4096, 151936
LIGER_D, LIGER_V, LIGER_T = 4096, 128256, 1024
CCE_N, CCE_D, CCE_V = 8192, 2304, 256000
TRITON_TARGET = Shape(16384, QWEN_D, QWEN_V, 1024, "bfloat16")
ONE_PASS_TARGET = Shape(8192, QWEN_D, QWEN_V, 1024, "bfloat16")
# gro_loss at the one-pass target with the chunk sizes of the design before issue 16 (gradient GEMMs
# per chunk: 1280 tokens = 768 MiB of fp32 logits; 2048; 4096) and the grouped default.
CHUNK_SWEEP = ["gro_loss_triton_c1280", "gro_loss_triton_c2048", "gro_loss_triton_c4096"]


def gpu_plans() -> List[Plan]:
    """The full GPU table (bf16). Ordered by priority: the run stops starting new groups when its
    time budget is spent, and records what it did not reach."""
    lpe = [Shape(n, QWEN_D, QWEN_V, 1024, "bfloat16") for n in (4096, 16384, 65536, 131072)]
    liger = [Shape(b * LIGER_T, LIGER_D, LIGER_V, LIGER_T, "bfloat16") for b in (2, 8, 16)]
    return [
        Plan("grpo_ent", [ONE_PASS_TARGET],
             ["matmul3_rows", "gro_loss_triton"] + CHUNK_SWEEP + ["matmul3", "plain", "liger", "gro_triton"],
             note="one-pass target: H200 bf16 N=8192 d=4096 V=151936 GRPO + entropy <= 1.15x the 3 bare GEMMs on "
                  "the same rows (matmul3_rows), <= 2 GiB extra"),
        Plan("logprob_entropy", lpe, CASE_IMPLS["logprob_entropy"],
             note="triton target: H200 bf16 N=16384 d=4096 V=151936 vs 3 bare matmuls, plain, Liger GRPO"),
        Plan("dapo", liger, CASE_IMPLS["dapo"], note="Liger's GRPO benchmark shapes (T=1024, d=4096, V=128256)"),
        Plan("grpo", [Shape(8 * LIGER_T, LIGER_D, LIGER_V, LIGER_T, "bfloat16")], CASE_IMPLS["grpo"]),
        Plan("sft", [Shape(CCE_N, CCE_D, CCE_V, 1024, "bfloat16")], CASE_IMPLS["sft"],
             note="CCE's published shape (N=8192, d=2304, V=256000)"),
        Plan("dpo", [Shape(8 * LIGER_T, LIGER_D, LIGER_V, LIGER_T, "bfloat16")], CASE_IMPLS["dpo"]),
        Plan("dapo", [Shape(n, QWEN_D, QWEN_V, 1024, "bfloat16") for n in (32768, 131072)],
             ["plain", "liger", "gro_torch", "gro_triton", "gro_loss_triton"], note="long context, Qwen vocab"),
    ]


def correctness_shapes() -> List[Shape]:
    """The GPU correctness sweep: real sizes, bf16 inputs vs a float32 PyTorch reference."""
    return [Shape(n, QWEN_D, QWEN_V, 1024, "bfloat16") for n in (8192, 16384, 32768)]


# ----------------------------------------------------------------------------------------------
# Inputs


def _group_size(batch: int) -> int:
    for g in (8, 4, 2):
        if batch % g == 0 and batch >= g:
            return g
    return batch


def make_inputs(case: Case, shape: Shape, device: str = "cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fresh inputs for one (case, shape). `hidden` and `weight` are leaves with requires_grad."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    B, T, d, V, dt = shape.batch, shape.seq_len, shape.hidden, shape.vocab, shape.torch_dtype
    if B < 1:
        raise ValueError(f"tokens ({shape.tokens}) must be at least seq_len ({shape.seq_len})")

    def randn(*size, std=1.0, dtype=torch.float32):
        return (torch.randn(*size, generator=gen, device=dev, dtype=torch.float32) * std).to(dtype)

    hidden = randn(B, T, d, dtype=dt)
    weight = randn(V, d, std=2.5 / math.sqrt(d), dtype=dt)
    targets = torch.randint(0, V, (B, T), generator=gen, device=dev)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen, device=dev)
    mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).to(torch.float32)
    if case.ignore_targets:
        targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    inp = {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask}

    if case.pairs:
        if B % 2:
            raise ValueError(f"DPO needs an even number of sequences, got batch {B}")
        P = B // 2
        inp["group_ids"] = torch.arange(B, device=dev) % P
        inp["labels"] = torch.cat([torch.ones(P, device=dev), -torch.ones(P, device=dev)]).to(torch.int64)
        inp["ref_hidden"] = (hidden.float() + randn(B, T, d, std=0.1)).to(dt)
        inp["ref_weight"] = (weight.float() + randn(V, d, std=0.1 * 2.5 / math.sqrt(d))).to(dt)
    elif case.name in ("grpo", "dapo", "grpo_ent"):
        G = _group_size(B)
        group_ids = torch.arange(B, device=dev) // G
        rewards = torch.randint(0, 2, (B,), generator=gen, device=dev).to(torch.float32)
        rewards[0::G] = 0.0  # every group holds a 0 and a 1: no zero-variance group
        rewards[1::G] = 1.0
        inp["rewards"] = rewards
        inp["group_ids"] = group_ids
        inp["advantages"] = group_advantages(rewards, group_ids)
        with torch.no_grad():
            logp = chunked_logp(hidden, weight, targets)
        inp["old_logp"] = logp + randn(B, T, std=0.1)
        inp["ref_logp"] = inp["old_logp"] + randn(B, T, std=0.1)
    elif case.name == "logprob_entropy":
        inp["token_adv"] = randn(B, T)

    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    return inp


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps), std with Bessel's correction (docs/objective.md, `linear` / `group_std`)."""
    adv = torch.empty_like(rewards)
    for g in torch.unique(group_ids).tolist():
        sel = group_ids == g
        r = rewards[sel]
        adv[sel] = (r - r.mean()) / (r.std(unbiased=True) + std_eps)
    return adv


def chunked_logp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 max_elements: int = 1 << 28) -> torch.Tensor:
    """float32 log-probs without grad, a few rows at a time (input preparation and references)."""
    lead = targets.shape
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    w = weight.detach().float()
    out = torch.zeros(y.shape, dtype=torch.float32, device=h.device)
    rows = max(1, max_elements // weight.shape[0])
    for a in range(0, h.shape[0], rows):
        z = h[a:a + rows].float() @ w.T
        lp = torch.log_softmax(z, dim=-1)
        yy = y[a:a + rows]
        out[a:a + rows] = lp.gather(1, yy.clamp_min(0)[:, None])[:, 0] * (yy != IGNORE_INDEX)
    return out.reshape(lead)


def input_bytes(inp: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inp.values() if isinstance(t, torch.Tensor))


def grad_bytes(inp: Dict[str, torch.Tensor]) -> int:
    return sum(inp[k].numel() * inp[k].element_size() for k in ("hidden", "weight"))
