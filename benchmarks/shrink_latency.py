"""CPU latency of a ResNet-18 shrunk by `lightning_spred.shrink`, as a ratio to the dense network, side by side.

The channel groups that spred zeroes (`groups={...: "channel"}`: a filter with its BatchNorm scale and shift) are
set to zero directly here, for a fraction of the inner channels of every BasicBlock (`conv1`/`bn1`, the channels
`shrink` removes whatever the residual additions do), so that the benchmark measures `shrink`, not a training run.
`shrink` removes them, checks that the outputs are unchanged, and the dense and shrunk networks are timed in
interleaved rounds in eval mode. A round's figure is the shrunk network's median forward time over the dense
one's in the same round; the script prints the median ratio over the rounds and its range, never a lone time.

    python benchmarks/shrink_latency.py                     # 50/75/90% of the inner channels, batch 1 and 32
    python benchmarks/shrink_latency.py --rounds 3 --batch-sizes 8   # quick look

Needs torch-pruning (`pip install -e ".[prune]"`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

from lightning_spred import shrink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from resnet import ResNet18  # noqa: E402  (torchvision's layout; torchvision does not import beside this torch build)


@torch.no_grad()
def zero_inner_channels(net: nn.Module, fraction: float, generator: torch.Generator) -> None:
    """Zero ``fraction`` of the channels of every block's ``conv1`` with ``bn1``'s scale and shift, as spred does."""
    for name, module in net.named_modules():
        if name.count(".") == 1 and name.startswith("layer"):  # a BasicBlock: layerS.B
            channels = module.conv1.out_channels
            chosen = torch.randperm(channels, generator=generator)[: round(fraction * channels)]
            for tensor in (module.conv1.weight, module.bn1.weight, module.bn1.bias):
                tensor[chosen] = 0


def median_time(model: nn.Module, x: torch.Tensor) -> float:
    return Timer("model(x)", globals={"model": model, "x": x}).blocked_autorange(min_run_time=0.2).median


@torch.no_grad()
def latency_ratios(shrunk: nn.Module, dense: nn.Module, x: torch.Tensor, rounds: int) -> list[float]:
    return [median_time(shrunk, x) / median_time(dense, x) for _ in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="inner channels zeroed")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per network")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    dense = ResNet18(num_classes=10)
    dense.train()(torch.randn(64, 3, args.size, args.size))  # running statistics that are not the defaults
    dense.eval()
    print(f"ResNet-18 layout, {args.size}x{args.size} inputs, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'inner channels zeroed':>22} {'removed':>8} {'MACs':>6} {'params':>7}" + "".join(
        f"{f'latency @{b}':>24}" for b in args.batch_sizes))  # fmt: skip
    for fraction in args.fractions:
        net = ResNet18(num_classes=10)
        net.load_state_dict(dense.state_dict())
        zero_inner_channels(net.eval(), fraction, generator)
        result = shrink(net, torch.randn(8, 3, args.size, args.size))  # raises if the outputs changed
        removed = sum(result.removed.values())
        cells = []
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, args.size, args.size)
            ratios = latency_ratios(result.model, dense, x, args.rounds)
            cells.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
        macs = result.macs[1] / result.macs[0]
        params = result.parameters[1] / result.parameters[0]
        print(f"{fraction:>22.0%} {removed:>8} {macs:>6.2f} {params:>7.2f}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
