"""Which module consumes which module's output, from one traced forward pass, and the normalisations among them.

Several decisions need the model's data flow, not its registration order: whether a normalisation undoes a penalised
layer's scale (the warnings of :mod:`lightning_spred.diagnostics`, ``lam_max`` at the current weights, the scales a
refit gives back in :mod:`lightning_spred.scales`), or whether a layer can hand its scale on to the next one.
:class:`ForwardTrace` records it with module hooks during the next forward pass.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ACROSS_CHANNELS", "BATCH_NORMS", "HOMOGENEOUS", "NORMS", "ForwardTrace", "following_norms"]

#: Normalisations with one scale and shift per channel, over the batch.
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
#: Normalisations across the channels: removing even a constant channel changes every other output.
ACROSS_CHANNELS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
#: Every normalisation whose output does not depend on its input's scale.
NORMS: tuple[type[nn.Module], ...] = (*BATCH_NORMS, *ACROSS_CHANNELS, nn.modules.instancenorm._InstanceNorm)
#: ``f(a * x) = a * f(x)`` for ``a > 0``: a layer's scale passes through these to the next layer.
HOMOGENEOUS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


class ForwardTrace:
    """Records, during the next forward pass of ``model``, which leaf module consumes which module's output.

    Args:
        model: the model to trace; hooks are added to every leaf module and removed by :meth:`stop`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[nn.Module, tuple[int, ...], int]] = []
        self._keep: list[Any] = []  # holds the traced tensors so that their ids stay unique during the pass
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._hook) for m in model.modules() if not list(m.children())
        ]

    @property
    def done(self) -> bool:
        return bool(self.calls)

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keep.clear()

    def consumers(self, module: nn.Module, through: tuple[type, ...] = ()) -> list[nn.Module]:
        """Modules whose input is ``module``'s output, looking past modules of the types in ``through``."""
        outputs = {out for m, _, out in self.calls if m is module}
        seen = set(outputs)  # an in-place module (ReLU(inplace=True)) returns its input: do not go round
        found: list[nn.Module] = []
        while outputs:
            nxt: set[int] = set()
            for m, inputs, out in self.calls:
                if outputs & set(inputs):
                    if isinstance(m, through):
                        nxt.add(out)
                    elif all(m is not f for f in found):
                        found.append(m)
            outputs = nxt - seen
            seen |= nxt
        return found

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, Tensor):  # (an LSTM's tuple): not followed
            return
        tensors = [a for a in args if isinstance(a, Tensor)]
        self._keep.extend([*tensors, output])
        self.calls.append((module, tuple(id(t) for t in tensors), id(output)))


def following_norms(trace: ForwardTrace, module: nn.Module, own: set[int]) -> list[nn.Module]:
    """The normalisations that take ``module``'s output directly, except those whose scale is in ``own`` (the ids of a
    channel group's tensors: its own BatchNorm)."""
    return [m for m in trace.consumers(module) if isinstance(m, NORMS) and id(getattr(m, "weight", None)) not in own]
