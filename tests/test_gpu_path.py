"""The GPU path of the chunked engine, proven on the CPU where a CPU can show it.

No GPU runs these tests, but what the CUDA path does for a 16-bit head runs here:
`helpers_gemm.GemmAudit(emulate_cuda=True)` computes CUDA's fp32-output 16-bit GEMMs on the CPU
(as cuBLAS does: fp32 sums of the 16-bit products) and `native_16bit_path` lets the engine take
that path (16-bit dz, fp32-output gradient GEMMs); the Triton kernels run under TRITON_INTERPRET=1.

1. dz has a buffer of its own: the gradient kernel refuses an output sharing the logits' memory,
   and the engine never hands it one (16-bit and fp32, one group or several).
2. Never two fp32 logits chunks alive: the CPU allocator's profile of a pass counts them.
3. Neither kernel writes its inputs, so autotuning restores nothing (no copies are timed).
4. fp16 gradients keep fp16's relative precision at a 1e-6 loss scale (1/tokens of a batch of a
   million tokens), where an unscaled fp16 dz underflows.
5. Every GEMM with 16-bit operands accumulates and returns fp32 (dh's, with K = V, included).
Design: the grouped gradient GEMMs (one group, several, the fp32 dW sum across groups) equal a
float64 reference, and a token-local preset still makes exactly 3 GEMMs per token.
"""
from __future__ import annotations

import math

import pytest
import torch

from gro_kernels import gro_loss, token_logprobs
from gro_kernels.logprobs import engine
from helpers_gemm import GemmAudit, native_16bit_path

triton = pytest.importorskip("triton")
from gro_kernels.kernels import launch  # noqa: E402
from gro_kernels.kernels import logits_grad as lg  # noqa: E402
from gro_kernels.kernels import row_stats as rs  # noqa: E402

if not launch.interpreting():
    # Everything here runs on CPU tensors; on a GPU machine the kernels are checked for real by
    # tests/test_triton_backend.py and bench/gpu_suite.sh.
    pytest.skip("these CPU proofs run the Triton kernels under TRITON_INTERPRET=1", allow_module_level=True)

N, D, V = 24, 16, 600          # V = 600: two vocabulary splits under the interpreter (512 + 88)
CHUNK = dict(chunk_elements=5 * V)   # 5 tokens per chunk, 5 chunks
ONE_GROUP = dict(CHUNK, group_elements=N * V)
GROUPS = dict(CHUNK, group_elements=10 * V)   # groups of 2 chunks: the fp32 dW sum across 3 groups
HALF = (torch.bfloat16, torch.float16)


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(D))
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 17]] = -100
    rh = h + 0.2 * torch.randn(N, D, generator=g, dtype=torch.float64)
    rw = w + 0.2 * torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    a, b, c = torch.randn(3, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (h, w, rh, rw)], y, (a, b, c)


def logprob_grads(backend, dtype, options, *, scale=1.0, seed=0, ref=True):
    """dh, dW of scale * sum(a logp + b H + c KL) through token_logprobs (forward, then backward)."""
    (h, w, rh, rw), y, (a, b, c) = inputs(dtype, seed)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    st = token_logprobs(h, w, y, temperature=0.9, return_entropy=True, backend=backend,
                        **(dict(ref_hidden=rh, ref_weight=rw) if ref else {}), **options)
    loss = (a * st.logp.double() + b * st.entropy.double()).sum()
    if ref:
        loss = loss + (c * st.kl.double()).sum()
    (scale * loss).backward()
    return h.grad, w.grad


def reference(dtype, *, scale=1.0, seed=0, ref=True):
    """The same in float64 from the inputs rounded to `dtype` (the naive backend: materialized
    logits, autograd)."""
    (h, w, rh, rw), y, (a, b, c) = inputs(dtype, seed)
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    st = token_logprobs(h, w, y, temperature=0.9, return_entropy=True, backend="naive",
                        **(dict(ref_hidden=rh.double(), ref_weight=rw.double()) if ref else {}))
    loss = (a * st.logp + b * st.entropy).sum() + ((c * st.kl).sum() if ref else 0)
    (scale * loss).backward()
    return h.grad, w.grad


def assert_grads_close(got, want, tol, what):
    for name, g, r in zip(("d_hidden", "d_weight"), got, want):
        assert torch.isfinite(g).all(), f"{what} {name}: not finite"
        err = (g.double() - r).abs().max() / r.abs().max()
        assert err <= tol, f"{what} {name}: max error {err:.3g} of the largest entry > {tol}"


# ---- 1. dz in its own buffer ---------------------------------------------------------------

def test_gradient_kernel_refuses_an_output_over_its_logits():
    z = torch.randn(4, 64)
    y = torch.randint(0, 64, (4,))
    vec = torch.zeros(4)
    kw = dict(lse=z.logsumexp(1), gl=vec, alpha=vec)
    for alias in (z, z.view(torch.bfloat16)[:, :64], z[:, :32].view(torch.float16)):
        out = alias if alias.shape == z.shape else alias.view(4, -1)[:, :64]
        with pytest.raises(ValueError, match="own buffer"):
            lg.logits_grad(z, None, y, 1.0, **kw, out=out)
    zr = torch.randn(4, 64)
    with pytest.raises(ValueError, match="own buffer"):
        lg.logits_grad(z, zr, y, 1.0, **kw, beta=vec, gamma=vec, out=zr)


@triton.jit
def _split_starts(out_ptr, n_splits, SPLIT_V: triton.language.constexpr, BLOCK_V: triton.language.constexpr):
    pid, _, v0 = launch.program_split(n_splits, SPLIT_V, BLOCK_V)
    triton.language.store(out_ptr + pid, v0)


def test_a_block_that_does_not_divide_its_split_does_not_run():
    # Each program walks [v0, v0 + SPLIT_V) in BLOCK_V steps, masked only at V: a BLOCK_V that did not divide
    # SPLIT_V would count (statistics) or write (gradient) the next split's first entries twice. program_split,
    # which every split kernel calls, refuses it when the kernel is compiled (here: traced by the interpreter).
    out = torch.zeros(4, dtype=torch.int64)
    _split_starts[(4,)](out, 2, SPLIT_V=512, BLOCK_V=256)
    assert out.tolist() == [0, 512, 0, 512]
    for block in (1024, 384):
        with pytest.raises(Exception, match="BLOCK_V must divide SPLIT_V"):
            _split_starts[(4,)](out, 2, SPLIT_V=512, BLOCK_V=block)
    # and the shipped sizes pass it: every autotuning config on the GPU's split, the interpreter's pair
    assert all(launch.SPLIT_V % c.kwargs["BLOCK_V"] == 0 for c in launch.CONFIGS)
    assert launch.INTERPRETER_SPLIT_V % launch.INTERPRETER_BLOCK_V == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [CHUNK, GROUPS, ONE_GROUP], ids=["chunk", "groups", "one-group"])
def test_engine_gives_the_kernel_a_buffer_of_its_own(monkeypatch, dtype, options):
    seen = []
    real = lg.logits_grad

    def spy(z, zr, y, inv_t, *, out, **kw):
        storages = {t.untyped_storage().data_ptr() for t in (z, zr) if t is not None}
        seen.append(out.untyped_storage().data_ptr() not in storages and out.dtype == dtype)
        return real(z, zr, y, inv_t, out=out, **kw)

    monkeypatch.setattr(lg, "logits_grad", spy)
    native_16bit_path(monkeypatch)
    with GemmAudit(emulate_cuda=True):
        logprob_grads("triton", dtype, options)
    assert len(seen) == 5 and all(seen)


# ---- 2. one fp32 logits chunk alive ----------------------------------------------------------

def live_buffers(fn, nbytes: int) -> int:
    """The most allocations of exactly `nbytes` alive at once while fn() runs (CPU allocator profile)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and abs(e.nbytes()) == nbytes)
    live = most = 0
    for _, b in events:
        live += 1 if b > 0 else -1
        most = max(most, live)
    return most


MEM_N, MEM_D, MEM_V, MEM_CT = 64, 12, 4096, 8   # dW [V, 12] and h are not chunk-sized


def dapo_step(backend, dtype, entropy, options):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(MEM_N // 8, 8, MEM_D, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(MEM_V, MEM_D, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, MEM_V, (MEM_N // 8, 8), generator=g)
    rewards, groups = torch.rand(MEM_N // 8, generator=g), torch.arange(MEM_N // 8) // 4

    def step():
        with GemmAudit(emulate_cuda=True):
            out = gro_loss(h, w, y, method="dapo", rewards=rewards, group_ids=groups,
                           entropy_coef=0.01 if entropy else 0.0, backend=backend, backend_options=options)
            out.loss.backward()

    return step


@pytest.mark.parametrize("entropy,want", [
    (False, 1),   # z; dz in place over it
    (True, 3),    # z, p = exp(z - max) and the row dot's product: the torch epilogue's own workspace
])
def test_live_chunk_buffers_in_the_allocator_profile(entropy, want):
    step = dapo_step("torch", torch.float32, entropy, dict(chunk_elements=MEM_CT * MEM_V))
    step()
    assert live_buffers(step, MEM_CT * MEM_V * 4) == want


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.bfloat16)])
@pytest.mark.parametrize("groups", [1, 2])
def test_each_chunk_dies_before_the_next_is_computed(monkeypatch, backend, dtype, groups):
    # (Triton's interpreter keeps its last launch's arguments alive, so for the Triton epilogue the
    # allocator's profile would count the interpreter; the engine's own references are checked here.)
    import weakref

    native_16bit_path(monkeypatch)
    chunks, real = [], engine.Head.logits

    def logits(head, s, e):
        assert all(r() is None for r in chunks), "a previous logits chunk is still referenced"
        z = real(head, s, e)
        chunks.append(weakref.ref(z))
        return z

    monkeypatch.setattr(engine.Head, "logits", logits)
    options = dict(chunk_elements=MEM_CT * MEM_V, group_elements=groups * MEM_CT * MEM_V)
    dapo_step(backend, dtype, True, options)()
    assert len(chunks) == MEM_N // MEM_CT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_memory_stays_bounded_for_any_n(monkeypatch, dtype):
    # The GPU's default groups (engine.layout with a CUDA device) on CPU tensors: every token's dz
    # while it costs at most 4 V d bytes, else groups of d tokens (with the fp32 dW sum for 16-bit
    # weights). The workspace beyond the gradients is then at most 4 V d bytes plus one fp32 chunk
    # (or, after the last chunk, one fp32 slice of dW's GEMM output if that is bigger), from
    # N = d/2 (one group) to N = 16 d (16 groups), and 16 groups need no more than 4.
    d, vocab, ct = 8, 4096, 4
    real = engine.layout
    monkeypatch.setattr(engine, "layout", lambda n, v, dim, device, dz_dtype, **kw:
                        real(n, v, dim, torch.device("cuda"), dz_dtype, **kw))
    native_16bit_path(monkeypatch)
    bound = 4 * vocab * d + max(ct * vocab, min(vocab * d, engine.DW_SLICE_ELEMENTS)) * 4 + 16384
    extras = []
    for n in (d // 2, 4 * d, 16 * d):
        g = torch.Generator().manual_seed(n)
        h = torch.randn(n // 2, 2, d, generator=g).to(dtype).requires_grad_()
        w = (0.3 * torch.randn(vocab, d, generator=g)).to(dtype).requires_grad_()
        y = torch.randint(0, vocab, (n // 2, 2), generator=g)
        kw = dict(rewards=torch.rand(n // 2, generator=g), group_ids=torch.arange(n // 2) // 2)

        def step():
            with GemmAudit(emulate_cuda=True):
                gro_loss(h, w, y, method="dapo", backend="torch", backend_options=dict(chunk_elements=ct * vocab),
                         **kw).loss.backward()

        step()
        h.grad = w.grad = None   # (outside the profile: a free of what existed before would lower its sum)
        peak = peak_bytes(step)
        grads = (h.numel() + w.numel()) * h.element_size()
        extras.append(peak - grads - 256 * n)   # [n] vectors of statistics and coefficients: 256 B a token
    assert max(extras) <= bound, (extras, bound)
    assert extras[2] <= extras[1] + 4096, extras


def peak_bytes(fn) -> int:
    """The most bytes alive at once through the CPU allocator while fn() runs (its profile)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = most = 0
    for _, b in events:
        live += b
        most = max(most, live)
    return most


# ---- 3. autotuning restores nothing ------------------------------------------------------------

def test_kernels_write_only_their_outputs_so_autotuning_restores_nothing():
    for tuned in (rs._row_partials_tuned, lg._logits_grad_tuned):
        assert not getattr(tuned, "restore_value", None) and not getattr(tuned, "reset_to_zero", None)
    # The gradient kernel leaves z and zr as they were (the torch epilogue is the one that may not).
    g = torch.Generator().manual_seed(1)
    z, zr = torch.randn(3, 700, generator=g), torch.randn(3, 700, generator=g)
    z0, zr0 = z.clone(), zr.clone()
    coef = torch.randn(4, 3, generator=g)
    out = torch.empty(3, 700, dtype=torch.bfloat16)
    lg.logits_grad(z, zr, torch.tensor([1, 5, 699]), 1.1, lse=z.logsumexp(1), gl=coef[0], alpha=coef[1],
                   beta=coef[2], gamma=coef[3], out=out)
    rs.row_stats(z, zr, torch.tensor([1, 5, 699]), 1.1, cap=4.0,
                 **{k: torch.empty(3) for k in ("lse", "logp", "top1", "ent", "kl", "ekl")})
    assert torch.equal(z, z0) and torch.equal(zr, zr0)


# ---- 4. fp16 precision at a tiny loss scale ----------------------------------------------------

LOSS_SCALE = 2.0 ** 16   # torch.amp.GradScaler's initial scale


def dapo_grads(backend, dtype, options, *, num_items):
    """h.grad, w.grad / LOSS_SCALE of DAPO's token-mean loss over `num_items` tokens, backpropagated
    with a loss scale as GradScaler does (gro_loss's fused pass: the gradients are formed in the
    forward call, the scale arrives in backward)."""
    (h, w, _, _), y, _ = inputs(dtype)
    h, w = h.reshape(4, 6, D).clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.Generator().manual_seed(3)
    kw = dict(rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]), group_ids=torch.tensor([0, 0, 1, 1]),
              old_logp=-5 - torch.rand(4, 6, generator=g, dtype=torch.float64), num_items_in_batch=num_items,
              temperature=0.9, entropy_coef=0.01)
    out = gro_loss(h, w, y.reshape(4, 6), method="dapo", backend=backend, backend_options=options, **kw)
    (out.loss * LOSS_SCALE).backward()
    return h.grad.double().reshape(N, D) / LOSS_SCALE, w.grad.double() / LOSS_SCALE


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [ONE_GROUP, GROUPS], ids=["one-group", "groups"])
def test_fp16_gradients_keep_their_precision_at_1e_minus_6(monkeypatch, backend, options):
    # 1/tokens = 1e-6: dz ~ 1e-6 p is below fp16's smallest subnormal (6e-8) for most entries, and
    # the per-token dh ~ 1e-6 is subnormal too until the loss scale multiplies it in backward.
    native_16bit_path(monkeypatch)
    for num_items in (24, 1e6):
        with GemmAudit(emulate_cuda=True):
            got = dapo_grads(backend, torch.float16, options, num_items=num_items)
        want = _dapo_reference(num_items)
        # dz rounded to fp16 (2^-11), dh and dW rounded to fp16 once more: a few fp16 ulps.
        assert_grads_close(got, want, 4e-3, f"fused fp16, {num_items:g} tokens")
    # The composable path: the upstream gradient already holds the loss scale.
    with GemmAudit(emulate_cuda=True):
        got = logprob_grads(backend, torch.float16, options, scale=1e-6 * LOSS_SCALE)
    assert_grads_close(got, reference(torch.float16, scale=1e-6 * LOSS_SCALE), 4e-3, "composable fp16")


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_gradients_take_gradscalers_loss_scale(dtype):
    # GradScaler starts at 2^16 > fp16's largest value 65504: the upstream gradient must scale the
    # precomputed gradients in fp32, not be rounded to the weights' dtype first (inf on main).
    got = dapo_grads("torch", dtype, CHUNK, num_items=24)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_grads_close(got, _dapo_reference(24, dtype), tol, f"{dtype} with a loss scale")


def _dapo_reference(num_items, dtype=torch.float16):
    """dapo_grads in float64 from the inputs rounded to `dtype`, on the naive backend."""
    (h, w, _, _), y, _ = inputs(dtype)
    h, w = h.double().reshape(4, 6, D).requires_grad_(), w.double().requires_grad_()
    g = torch.Generator().manual_seed(3)
    kw = dict(rewards=torch.tensor([1.0, 0.0, 0.5, 0.2], dtype=torch.float64), group_ids=torch.tensor([0, 0, 1, 1]),
              old_logp=-5 - torch.rand(4, 6, generator=g, dtype=torch.float64), num_items_in_batch=num_items,
              temperature=0.9, entropy_coef=0.01)
    gro_loss(h, w, y.reshape(4, 6), method="dapo", backend="naive", **kw).loss.backward()
    return h.grad.reshape(N, D), w.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [ONE_GROUP, GROUPS], ids=["one-group", "groups"])
def test_fp16_label_smoothing_with_heavy_class_weights_stays_finite(monkeypatch, backend, options):
    # The mean log-prob's part of dz, gM (W/V p - w_v/V), reaches |gM| W/V: with class weights of a
    # large mean W/V an fp16 dz scaled by |gM| alone overflowed (inf gradients after the merge of the
    # head options into the fp16 scales; main's unscaled fp16 dz was finite).
    (h, w, _, _), y, _ = inputs(torch.float16)
    cw = torch.ones(V, dtype=torch.float64)
    cw[[0, 1, 2]] = 1e7            # W / V = 5e4
    h, w = h.reshape(4, 6, D), w

    def grads(leaf_dtype, **kw):
        hh, ww = h.to(leaf_dtype).clone().requires_grad_(), w.to(leaf_dtype).clone().requires_grad_()
        out = gro_loss(hh, ww, y.reshape(4, 6), method="sft", reduction="sum", label_smoothing=0.1,
                       class_weight=cw.to(torch.float64 if leaf_dtype == torch.float64 else torch.float32), **kw)
        (out.loss * 2.0 ** -10).backward()
        return hh.grad.double().reshape(N, D), ww.grad.double()

    want = grads(torch.float64, backend="naive")
    native_16bit_path(monkeypatch)
    with GemmAudit(emulate_cuda=True):
        got = grads(torch.float16, backend=backend, backend_options=options)
    assert_grads_close(got, want, 4e-3, f"fp16 label smoothing with class weights, {backend}")


def test_fp16_row_scale_is_a_power_of_two_that_leaves_headroom():
    size = torch.tensor([1e-6, 3.0, 65504.0, 0.0, 1e-30])
    s = engine.fp16_row_scale(size)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    scaled = (size * s)[:3]
    assert ((scaled >= 2 ** 6) & (scaled < 2 ** 7)).all()
    assert s[3] == s[4] == 2.0 ** 64   # no gradient (or a negligible one): never the group's common scale


# ---- 5. and the design: fp32 accumulation, exactness, 3 GEMMs per token ----------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("options", [ONE_GROUP, GROUPS], ids=["one-group", "groups"])
def test_16bit_gradient_gemms_accumulate_in_fp32_and_match_float64(monkeypatch, backend, dtype, options):
    native_16bit_path(monkeypatch)
    with GemmAudit(emulate_cuda=True) as audit:
        got = logprob_grads(backend, dtype, options)
    half = [gm for gm in audit.gemms if gm.a_dtype in HALF]
    assert half, "the 16-bit path was not taken"
    # Every sum of 16-bit products is added in fp32: an fp32 output, or split-K pieces added in fp32.
    bad = [gm for gm in half if gm.out_dtype != torch.float32 and not gm.fp32_reduction]
    assert not bad, bad
    dh = [gm for gm in half if gm.k == V]
    assert dh and all(gm.out_dtype == torch.float32 for gm in dh), "dh's GEMM (K = V) must return fp32"
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_grads_close(got, reference(dtype), tol, f"{dtype} {backend}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [CHUNK, GROUPS, ONE_GROUP], ids=["chunk", "groups", "one-group"])
def test_grouped_gradient_gemms_equal_float64(backend, options):
    # fp32 inputs: the groups change only the order of fp32 sums.
    got = logprob_grads(backend, torch.float32, options)
    assert_grads_close(got, reference(torch.float32), 1e-5, f"fp32 {backend}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [CHUNK, GROUPS, ONE_GROUP], ids=["chunk", "groups", "one-group"])
def test_token_local_preset_makes_three_gemms_per_token(monkeypatch, dtype, options):
    (h, w, _, _), y, _ = inputs(dtype)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))   # every token counts
    h, w = h.reshape(4, 6, D).clone().requires_grad_(), w.clone().requires_grad_()
    native_16bit_path(monkeypatch)
    with GemmAudit(emulate_cuda=True) as audit:
        out = gro_loss(h, w, y.reshape(4, 6), method="grpo", kl_coef=0.0, rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]),
                       group_ids=torch.tensor([0, 0, 1, 1]), entropy_coef=0.01, backend="torch",
                       backend_options=options)
        out.loss.backward()
    assert audit.flops == 3 * 2 * N * D * V, audit.flops / (2 * N * D * V)


def test_default_groups_follow_the_memory_budget():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    v, d = 151936, 4096
    # bf16 head, N <= 2d: one group (dW written once); beyond it groups of d tokens (whole chunks).
    one = engine.layout(8192, v, d, cuda, torch.bfloat16)
    assert (one.chunk, one.group, one.n_groups) == (1280, 8192, 1)
    many = engine.layout(131072, v, d, cuda, torch.bfloat16)
    assert many.group == 3840 and many.group % many.chunk == 0 and many.group * v * 2 <= 2 * v * d
    # fp32 dz: groups of at most 4 V d bytes; a CPU: one chunk per group; an explicit budget wins.
    assert engine.layout(65536, v, d, cuda, torch.float32).group * v * 4 <= 4 * v * d
    cpu_lay = engine.layout(2048, 32768, 512, cpu, torch.float32)
    assert cpu_lay.group == cpu_lay.chunk == 128
    assert engine.layout(2048, 32768, 512, cpu, torch.float32, group_elements=512 * 32768).group == 512
