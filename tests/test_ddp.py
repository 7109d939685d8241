"""DDP on the CPU (gloo, two real processes) against one process with the same global batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_run import rank_tensor

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(strategy: str, out: Path) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--strategy", strategy, "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(path) for path in sorted(out.glob("rank*.pt"))] + [torch.load(out / "main.pt")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    result, main = run("single", tmp_path_factory.mktemp("single") / "out")
    return {**result, "main": main}


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "ddp_bucket_view"])
def test_ranks_agree_with_one_process(strategy, single, tmp_path):
    *ranks, main = run(strategy, tmp_path / "out")
    assert len(ranks) == 2
    # the report, the path and the selected features reach the launching script (ddp_spawn: from rank zero)
    assert main == single["main"] and main["path"] and main["features"]
    for rank in ranks:
        assert rank["names"] == single["names"]  # plain model, no factors left on any rank
        assert list(rank["state"]) == list(single["state"])
        for key, value in rank["state"].items():
            assert torch.equal(value, ranks[0]["state"][key]), f"ranks differ on {key}"
            torch.testing.assert_close(value, single["state"][key], atol=1e-4, rtol=0, msg=key)
        assert rank["metrics"] == ranks[0]["metrics"]  # logged sparsity, nonzeros, penalty: the same on every rank
        assert "spred/sparsity" in rank["metrics"]
        both = torch.cat([rank_tensor(0), rank_tensor(1)])
        assert rank["metric_sparsity"] == pytest.approx((both == 0).float().mean().item())  # torchmetrics synced
        # DDP wraps the plain model: it all-reduces the weights' gradients, as without the callback, and has no
        # factors to leave out (they are not parameters of the model)
        assert rank["not_reduced"] == []
    weight = ranks[0]["state"]["net.0.weight"]
    assert (weight == 0).any() and (weight != 0).any()
