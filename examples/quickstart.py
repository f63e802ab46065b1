"""Per-token log-probs, entropy and exact KL from hidden states, on every CPU backend."""
import torch

from gro_kernels.logprobs import token_logprobs

torch.manual_seed(0)
B, T, d, V = 2, 6, 64, 1000
hidden = torch.randn(B, T, d, requires_grad=True)
weight = torch.randn(V, d) / d**0.5
targets = torch.randint(0, V, (B, T))
targets[:, :2] = -100  # prompt tokens: ignored
ref_weight = weight + 0.01 * torch.randn(V, d)

for backend in ("naive", "torch"):
    st = token_logprobs(hidden, weight, targets, return_entropy=True,
                        ref_hidden=hidden.detach(), ref_weight=ref_weight, backend=backend)
    valid = targets != -100
    print(f"{backend:>6}: mean logp {st.logp[valid].mean():.4f}  entropy {st.entropy[valid].mean():.4f}  "
          f"KL {st.kl[valid].mean():.2e}")
