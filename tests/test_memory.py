"""The chunking is real: peak memory stays within the documented workspace, for `token_logprobs`
(forward, then backward) and for `gro_loss`'s single fused pass.

Runs in a fresh subprocess (so the high-water mark of resident memory belongs to this measurement
alone) at a size where the materialized float32 logits alone would take 4 GiB.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gro_kernels.logprobs.engine import CPU_CHUNK_ELEMENTS, chunk_tokens

N, D, V = 8192, 32, 131072
LOGITS_BYTES = N * V * 4  # 4 GiB
# engine.py's workspace on the CPU (torch epilogue, no reference head): three chunk-sized float32
# buffers alive at once (z, exp(z - max), one transient), never a second z.
WORKSPACE_BYTES = 3 * chunk_tokens(N, V, __import__("torch").device("cpu")) * V * 4
assert WORKSPACE_BYTES <= 3 * max(CPU_CHUNK_ELEMENTS, 16 * V) * 4
SLACK_BYTES = 32 << 20  # allocator and interpreter noise, small [N]-vectors

SCRIPT = textwrap.dedent(f"""
    import json, resource, torch
    from gro_kernels import gro_loss
    from gro_kernels.logprobs import token_logprobs
    torch.manual_seed(0)
    h = (torch.randn({N}, {D}) * 0.3).requires_grad_()
    w = (torch.randn({V}, {D}) * 0.3).requires_grad_()
    y = torch.randint(0, {V}, ({N},))
    y[::7] = -100
    warm = token_logprobs(h[:64], w[:4096], y[:64].clamp(0, 4095), return_entropy=True, backend="torch")
    (warm.logp.sum() + warm.entropy.sum()).backward()
    h.grad = w.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if {{call!r}} == "token_logprobs":
        st = token_logprobs(h, w, y, return_entropy=True, backend="torch")
        (st.logp.sum() - 0.1 * st.entropy.sum()).backward()
    else:
        r = torch.rand({N} // 64)
        gro_loss(h.view(-1, 64, {D}), w, y.view(-1, 64), method="dapo", rewards=r, group_ids=torch.arange(r.numel()) // 4,
                 entropy_coef=0.01, backend="torch").loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ok = bool(torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0)
    grads = (h.numel() + w.numel()) * 4  # the gradients themselves are not workspace
    print(json.dumps({{"extra": peak - base - grads, "ok": ok}}))
""")


@pytest.mark.parametrize("call", ["token_logprobs", "gro_loss"])
def test_peak_memory_is_bounded_by_workspace(call):
    # A fixed mmap threshold makes glibc return every large freed buffer at once, so the resident
    # high-water mark measures live allocations rather than free heap glibc chose to keep.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("{call!r}", repr(call))], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"]
    assert res["extra"] <= WORKSPACE_BYTES + SLACK_BYTES, (
        f"peak grew by {res['extra'] / 2**20:.0f} MiB; the documented workspace is "
        f"{WORKSPACE_BYTES / 2**20:.0f} MiB (materialized logits would be {LOGITS_BYTES / 2**30:.0f} GiB)"
    )
