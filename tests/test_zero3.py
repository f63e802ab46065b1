"""DeepSpeed ZeRO-3 (deepspeed 0.19.8, CPU accelerator, 2 gloo processes): TRL's GRPO and DPO trainers
on gro_kernels land on TRL's own parameters, with an untied and a tied head.

gro_kernels' loss runs inside the model's forward, where the engine gathers the partitioned head (a
parameter read in a module's forward is gathered for it and for its backward), so ZeRO-3 needs
nothing of its own. Read anywhere else, the weight is ZeRO-3's empty placeholder: refused with an
error that says what to do. The workers run in tests/trl_zero3_worker.py."""
import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from trl_fixtures import save_tiny_model, torchrun  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_zero3_grpo_and_dpo_match_trl_tied_and_untied(tmp_path):
    untied = save_tiny_model(tmp_path / "untied")
    tied = save_tiny_model(tmp_path / "tied", tie=True)
    torchrun("trl_zero3_worker.py", untied, tied, tmp_path, timeout=300, DS_ACCELERATOR="cpu")
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for tie in ("untied", "tied"):
        for kind, trl_name, gro_name, keys in (
                ("grpo", "GRPOTrainer", "GROGRPOTrainer", ("loss", "kl", "entropy", "grad_norm")),
                ("dpo", "DPOTrainer", "GRODPOTrainer", ("loss", "rewards/margins", "grad_norm", "entropy"))):
            ref, ours = results[(tie, kind, trl_name)], results[(tie, kind, gro_name)]
            moved = False
            for name, want in ref["params"].items():
                torch.testing.assert_close(ours["params"][name], want, rtol=0, atol=1e-5,
                                           msg=lambda m: f"{tie} {kind} {name}: {m}")
            for r, o in zip(ref["log"], ours["log"]):
                for key in keys:
                    if key in r:
                        moved = moved or (key == "loss" and r[key] != 0)
                        assert o[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (tie, kind, key)
            assert moved and len(ref["log"]) == len(ours["log"]) >= 2
    head_error, logprobs_error = results["errors"]
    assert head_error and "DeepSpeed ZeRO-3" in head_error and "GatheredParameters" in head_error
    assert logprobs_error and "ZeRO-3" in logprobs_error and "forward" in logprobs_error
