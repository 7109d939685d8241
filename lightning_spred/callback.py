"""``SpredCallback``: an exact L1 (or group L1) penalty for any LightningModule, added with one callback."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import LBFGS, AdamW, Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_spred.factorization import Factorization, factorize, merge
from lightning_spred.functional import count_zeros, group_norms, penalty
from lightning_spred.groups import FeatureSelection, selected_features
from lightning_spred.report import SparsityReport, sparsity_report
from lightning_spred.selection import DEFAULT_MODULES, GroupDim, SelectFn, Target, select_parameters
from lightning_spred.wandb_views import log_layer_views, write_summary

__all__ = ["SpredCallback"]


class SpredCallback(Callback):
    r"""Train any LightningModule with an exact L1 penalty ``lam * sum|w|`` on the chosen weights.

    Each chosen weight is written as ``w = u * v`` when fitting starts (``u = w``, ``v = 1``, so the model's
    function is unchanged) and weight decay ``lam`` is applied to ``u`` and ``v`` as a gradient, once per
    optimizer step. The minima of this problem are exactly those of ``loss + lam * sum|w|`` (Ziyin & Wang,
    "spred: Solving L1 Penalty with SGD", ICML 2023). When fitting ends (or fails), every weight is merged
    back into a plain ``nn.Parameter`` with the same name, and entries with ``|w| <= threshold`` become exact
    zeros: the model that leaves ``fit`` is your own model, only sparse.

    With ``nn.MSELoss`` (``1/n ||y - Xw||^2``) a linear model trained with ``SpredCallback(lam)`` has the
    minimiser of scikit-learn's ``Lasso(alpha=lam / 2)`` (whose data term is ``1/(2n) ||y - Xw||^2``).

    With ``groups``, one factor is shared by all entries of a group (a column, a row, a channel) and the
    penalty becomes the group lasso ``lam * sum_g ||w_g||_2``, which zeroes whole groups.

    How it trains: the forward and backward passes use the plain weight ``w``. Just before each optimizer
    step, ``w.grad`` (already unscaled under AMP, clipped if clipping is on, and all-reduced under DDP) is
    turned into the gradients of ``u`` and ``v`` plus ``lam * u`` and ``lam * v``; just after the step
    ``w`` is set to ``u * v``. The optimizer you configure updates ``u`` and ``v``, so build it from
    ``self.parameters()`` (or a submodule's ``parameters()``): the factors are registered beside each
    weight while fitting, as ``<name>__spred_u`` and ``<name>__spred_v``. Checkpoints never hold them:
    every checkpoint has the plain model's keys (loadable with strict loading into the model without
    this callback) and the exact factors are kept in this callback's own state for resuming.

    What it logs, through ``LightningModule.log`` so every logger gets it, at the trainer's
    ``log_every_n_steps`` and at each training epoch's end: ``spred/sparsity`` (all penalised weights, also
    in the progress bar), ``spred/sparsity/<name>`` per weight, ``spred/nonzeros`` and ``spred/penalty``
    (``lam * sum|w|``). With a ``WandbLogger`` it also logs a per-layer sparsity bar chart and histograms of
    ``log10|w|`` at each epoch's end, and the final sparsity and compression in the run summary. When
    fitting ends, a per-layer table is printed (rank zero) and kept: see :meth:`report`.

    Args:
        lam: the L1 coefficient (``>= 0``).
        threshold: entries with ``|w| <= threshold`` (for grouped weights: whole groups with
            ``||w_g|| <= threshold``) are exact zeros in the merged model, in checkpoints and in the logged
            sparsity. Zeroed weights decay towards 0 exponentially (about ``2 * lr * lam``
            per step) but never reach it exactly; raise the threshold for short or noisy runs.
        modules: module types whose ``weight`` is penalised.
        include: name patterns (shell-style, ``*`` matches dots) of further parameters to penalise,
            matched against ``named_parameters()``.
        exclude: name patterns of parameters never penalised.
        select: a function ``(name, module, parameter) -> bool`` that replaces ``modules`` and ``include``.
        lam_overrides: name pattern to ``lam`` for parameters with their own coefficient.
        groups: name pattern to group dimension: ``"input"`` (dim 1: input features of a ``Linear``, input
            channels of a conv), ``"output"`` (dim 0: neurons, filters), an integer dimension, or ``None``.
        verbose: print which parameters are penalised when fitting starts (rank zero only).

    Raises:
        TypeError: ``lam``, ``threshold`` or an override is not a real number, or ``modules`` holds a non-module type.
        ValueError: ``lam`` or ``threshold`` is negative, NaN or infinite.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> callback = SpredCallback(lam=1e-4)
        >>> trainer = Trainer(callbacks=[callback], max_epochs=1, logger=False)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        lam: float,
        *,
        threshold: float = 1e-6,
        modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        select: Optional[SelectFn] = None,
        lam_overrides: Optional[Mapping[str, float]] = None,
        groups: Optional[Mapping[str, GroupDim]] = None,
        verbose: bool = True,
    ) -> None:
        self.lam = _check_coefficient("lam", lam)
        self.threshold = _check_coefficient("threshold", threshold)
        self.lam_overrides = {
            k: _check_coefficient(f"lam_overrides[{k!r}]", v) for k, v in (lam_overrides or {}).items()
        }
        self.modules = tuple(modules)
        if not all(isinstance(m, type) and issubclass(m, nn.Module) for m in self.modules):
            raise TypeError(f"`modules` must hold nn.Module subclasses such as nn.Linear, got {modules!r}.")
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        if select is not None and not callable(select):
            raise TypeError(f"`select` must be a function (name, module, parameter) -> bool, got {select!r}.")
        if select is not None and self.include:
            raise ValueError("Give either `select` or `include`, not both: `select` alone decides when given.")
        self.select = select
        self.groups = dict(groups or {})
        self.verbose = verbose
        self._factorizations: list[Factorization] = []
        self._optimizer_hooks: list[RemovableHandle] = []
        self._ddp_ignore_before: Optional[list[str]] = None
        self._ddp_root: Optional[nn.Module] = None
        self._report: Optional[SparsityReport] = None
        self._grouped: dict[str, tuple[nn.Parameter, int]] = {}

    @property
    def factorizations(self) -> list[Factorization]:
        """The weights factorised in the current fit (empty outside ``fit``)."""
        return list(self._factorizations)

    def report(self) -> SparsityReport:
        """Per-layer parameters, nonzeros, sparsity and compression of the model the last fit returned.

        Raises:
            RuntimeError: no fit with this callback has ended yet.
        """
        if self._report is None:
            raise RuntimeError("No fit with this SpredCallback has ended yet: call `trainer.fit` first.")
        return self._report

    def selected_features(
        self, parameter: Optional[str] = None, names: Optional[Sequence[str]] = None
    ) -> FeatureSelection:
        """The groups (input features, neurons, channels) a grouped weight still uses after the last fit.

        Args:
            parameter: name of a weight penalised with ``groups``; may be left out when there is only one.
            names: one name per group (for example gene names, for ``"input"`` groups).

        Raises:
            RuntimeError: no fit with groups has ended yet.
            ValueError: ``parameter`` is not a grouped weight, or is needed to choose among several.
        """
        if not self._grouped:
            raise RuntimeError("No fit with `groups=` has ended yet: fit with SpredCallback(..., groups={...}) first.")
        if parameter is None and len(self._grouped) > 1:
            raise ValueError(
                f"Several weights have groups: choose one with `parameter=`, one of {list(self._grouped)}."
            )
        parameter = parameter or next(iter(self._grouped))
        if parameter not in self._grouped:
            raise ValueError(f"`{parameter}` was not penalised with groups; grouped weights: {list(self._grouped)}.")
        weight, dim = self._grouped[parameter]
        return selected_features(weight, dim, names)

    # ----------------------------------------------------------------------------------------------
    # Overridable choices
    # ----------------------------------------------------------------------------------------------
    def select_parameters(self, pl_module: LightningModule) -> list[Target]:
        """Choose the parameters to penalise; override to choose differently.

        Returns:
            One :class:`~lightning_spred.selection.Target` per parameter, with its ``lam`` and group dimension.
        """
        return select_parameters(
            pl_module,
            lam=self.lam,
            modules=self.modules,
            include=self.include,
            exclude=self.exclude,
            select=self.select,
            lam_overrides=self.lam_overrides,
            groups=self.groups,
        )

    def compute_metrics(self) -> dict[str, Tensor]:
        """The values logged during training; override to add or change them.

        Computed from the weights the model would leave ``fit`` with now (``u * v``, thresholded) on this
        process: every rank holds the same weights under DDP, so no synchronisation is needed.
        Grouped weights also report ``spred/groups/<name>``, the number of groups (features, neurons,
        channels) still in use.
        """
        metrics: dict[str, Tensor] = {}
        zeros, total, value = 0, 0, 0
        for f in self._factorizations:
            weight = f.sparse_weight()
            layer_zeros = count_zeros(weight)
            metrics[f"spred/sparsity/{f.path}"] = layer_zeros / weight.numel()
            if f.dim is not None:
                metrics[f"spred/groups/{f.path}"] = (group_norms(weight, f.dim) > 0).sum().float()
            zeros, total, value = zeros + layer_zeros, total + weight.numel(), value + penalty(weight, f.lam, f.dim)
        metrics["spred/nonzeros"] = torch.as_tensor(total - zeros, dtype=torch.float32)
        metrics["spred/penalty"] = torch.as_tensor(value, dtype=torch.float32)
        metrics["spred/sparsity"] = torch.as_tensor(zeros / total, dtype=torch.float32)
        return metrics

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer)
        self._merge()  # a previous fit that ended outside Lightning's hooks must not leave factors behind
        targets = self.select_parameters(pl_module)
        if not targets:
            raise ValueError(
                f"SpredCallback found nothing to penalise in {type(pl_module).__name__}: no trainable `weight` of"
                f" {[m.__name__ for m in self.modules]} and no parameter matching `include`. Choose parameters"
                " with `modules=`, `include=[...]` or `select=`."
            )
        self._factorizations = [
            factorize(t.module, t.name, t.path, lam=t.lam, dim=t.dim, threshold=self.threshold) for t in targets
        ]
        self._ignore_factors_in_ddp(pl_module)
        if self.verbose:
            count = sum(f.weight.numel() for f in self._factorizations)
            rank_zero_info(
                f"SpredCallback: L1 penalty on {len(targets)} parameters ({count:,} weights):"
                f" {', '.join(t.path for t in targets)}"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            by_optimizer = _assign_to_optimizers(self._factorizations, trainer.optimizers)
            _check_optimizers(trainer, by_optimizer)
        except Exception:
            self._merge(threshold=0.0)  # nothing was trained: give the model back exactly as it was
            raise
        self._broadcast_factors()
        for optimizer, factorizations in by_optimizer.items():
            self._optimizer_hooks += [
                optimizer.register_step_pre_hook(_to_factor_gradients(factorizations)),
                optimizer.register_step_post_hook(_refresh_weights(factorizations)),
            ]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Computed only when Lightning will write to the loggers (as LearningRateMonitor does), to keep steps cheap.
        if self._factorizations and trainer._logger_connector.should_update_logs:
            self._log(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._factorizations:
            return
        self._log(pl_module, on_step=False)
        for experiment in _wandb_runs(trainer):
            weights = [(f.path, f.sparse_weight()) for f in self._factorizations]
            log_layer_views(experiment, sparsity_report(weights), weights, trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self._factorizations:
            return
        self._merge()
        if self.verbose:
            rank_zero_info(f"SpredCallback: sparsity of the penalised weights\n{self.report()}")
        for experiment in _wandb_runs(trainer):
            write_summary(experiment, self.report())

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips `teardown` when fit raises or is interrupted: merge here so the user keeps a plain model.
        self._merge()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        written_with_spred = self.state_key in checkpoint.get("callbacks", {})
        if self._factorizations and not written_with_spred and "optimizer_states" in checkpoint:
            self._merge(threshold=0.0)
            raise ValueError(
                "This checkpoint was written without SpredCallback: its optimizer state has no entries for the"
                " spred factors, so training cannot resume from it. To fine-tune a dense model into a sparse one,"
                " load its weights (`model = MyModel.load_from_checkpoint(path)`) and call `trainer.fit(model)`"
                " without `ckpt_path`."
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "factors": {f.path: {"u": f.u.detach().clone(), "v": f.v.detach().clone()} for f in self._factorizations}
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        factors = state_dict.get("factors", {})
        for f in self._factorizations:
            if f.path not in factors:
                continue  # a weight penalised now but not then starts from the checkpoint's plain weight
            u, v = factors[f.path]["u"], factors[f.path]["v"]
            if u.shape != f.u.shape or v.shape != f.v.shape:
                raise ValueError(
                    f"The checkpoint's spred factors for `{f.path}` have shapes {tuple(u.shape)}, {tuple(v.shape)}"
                    f" but the model needs {tuple(f.u.shape)}, {tuple(f.v.shape)}: the model or its `groups`"
                    " changed since the checkpoint was written. Resume with the same settings, or load the"
                    " checkpoint's weights into the model and fit without `ckpt_path`."
                )
            f.set_factors(u.to(f.u.device), v.to(f.v.device))

    # ----------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------
    def _merge(self, threshold: Optional[float] = None) -> None:
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()
        if not self._factorizations:
            return
        for f in self._factorizations:
            merge(f, threshold)
        self._grouped = {f.path: (f.weight, f.dim) for f in self._factorizations if f.dim is not None}
        self._report = sparsity_report((f.path, f.weight) for f in self._factorizations)
        self._factorizations.clear()
        self._restore_ddp_ignore()

    def _log(self, pl_module: LightningModule, on_step: bool) -> None:
        metrics = self.compute_metrics()
        sparsity = metrics.pop("spred/sparsity")
        pl_module.log("spred/sparsity", sparsity, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step)

    def _ignore_factors_in_ddp(self, pl_module: LightningModule) -> None:
        # The factors take no part in the forward pass: DDP must neither all-reduce nor wait for their gradients.
        # Their gradients are computed from the already all-reduced `w.grad`, identically on every rank.
        self._ddp_ignore_before = getattr(pl_module, "_ddp_params_and_buffers_to_ignore", None)
        self._ddp_root = pl_module
        names = [name for f in self._factorizations for name in f.factor_paths]
        pl_module._ddp_params_and_buffers_to_ignore = [*(self._ddp_ignore_before or []), *names]

    def _restore_ddp_ignore(self) -> None:
        root, self._ddp_root = self._ddp_root, None
        if self._ddp_ignore_before is None:
            del root._ddp_params_and_buffers_to_ignore
        else:
            root._ddp_params_and_buffers_to_ignore = self._ddp_ignore_before

    def _broadcast_factors(self) -> None:
        # DDP broadcasts `w` from rank 0 but not the ignored factors: send them too, so every rank holds the same.
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for f in self._factorizations:
            dist.broadcast(f.u.data, src=0)
            dist.broadcast(f.v.data, src=0)
            f.refresh_weight()


def _wandb_runs(trainer: Trainer) -> list[Any]:
    """The W&B runs of the trainer's WandbLoggers, on rank zero only (other ranks have no real run)."""
    return [
        logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger) and trainer.is_global_zero
    ]


def _to_factor_gradients(factorizations: list[Factorization]) -> Any:
    def convert() -> None:
        with torch.no_grad():
            for f in factorizations:
                f.accumulate_factor_gradients()

    # With a closure (Lightning's automatic optimization, manual `opt.step()`), the backward pass, AMP unscaling
    # and clipping all happen inside `optimizer.step`: convert once the closure has run. Without one (AMP's
    # `scaler.step`, plain PyTorch) the gradients are final already.
    def hook(optimizer: Optimizer, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        # `args` starts with the optimizer itself: `step(self, closure=None)`.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            convert()
            return None

        def closure_then_convert() -> Any:
            result = closure()
            convert()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_convert}
        return (args[0], closure_then_convert, *args[2:]), kwargs

    return hook


def _refresh_weights(factorizations: list[Factorization]) -> Any:
    def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for f in factorizations:
            f.refresh_weight()

    return hook


def _assign_to_optimizers(
    factorizations: list[Factorization], optimizers: Sequence[Optimizer]
) -> dict[Optimizer, list[Factorization]]:
    owner = {id(p): opt for opt in optimizers for group in opt.param_groups for p in group["params"]}
    by_optimizer: dict[Optimizer, list[Factorization]] = {}
    for f in factorizations:
        owners = {owner.get(id(p)) for p in (f.weight, f.u, f.v)}
        if len(owners) != 1 or None in owners:
            u_name, v_name = f.factor_paths
            raise ValueError(
                f"`{f.path}` and its spred factors `{u_name}`, `{v_name}` must all be in one optimizer, so that the"
                " optimizer trains the factors and AMP unscaling and clipping see the weight's gradient. Build the"
                " optimizer in `configure_optimizers` from `self.parameters()` (or a submodule's `parameters()`),"
                " which includes the factors SpredCallback adds beside each weight, or exclude the weight with"
                f" `SpredCallback(..., exclude=['{f.path}'])`."
            )
        by_optimizer.setdefault(owners.pop(), []).append(f)
    return by_optimizer


def _check_optimizers(trainer: Trainer, by_optimizer: dict[Optimizer, list[Factorization]]) -> None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    for optimizer, factorizations in by_optimizer.items():
        name = type(optimizer).__name__
        if isinstance(optimizer, LBFGS):
            raise ValueError(
                "LBFGS re-evaluates the model inside its step, while SpredCallback updates the weights from their"
                " factors only between steps. Use a first-order optimizer (SGD, Adam, ...)."
            )
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"{name} unscales gradients inside its own step (fused=True), after SpredCallback has added the"
                " penalty, so the penalty would be divided by the loss scale. Use it with `fused=False`."
            )
        factors = {id(p) for f in factorizations for p in (f.u, f.v)}
        decayed = [
            g for g in optimizer.param_groups if g.get("weight_decay", 0) and factors & {id(p) for p in g["params"]}
        ]
        if decayed and isinstance(optimizer, AdamW):
            rank_zero_warn(
                f"AdamW applies decoupled weight decay (weight_decay={decayed[0]['weight_decay']}) to the factors:"
                " it is not the L1 penalty and shrinks weights by an amount that depends on the learning rate."
                " SpredCallback already applies `lam`; use Adam, or put the factors in a group with weight_decay=0.",
                category=UserWarning,
            )
        elif decayed:
            rank_zero_warn(
                f"{name} puts weight_decay={decayed[0]['weight_decay']} on the spred factors, which adds to `lam`:"
                " the effective L1 coefficient is lam + weight_decay. Put the factors in a parameter group with"
                " weight_decay=0 to penalise with `lam` alone.",
                category=UserWarning,
            )


def _check_strategy(trainer: Trainer) -> None:
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"SpredCallback supports single-device training and DDP (`strategy='ddp'`, 'ddp_spawn', 'ddp_fork'),"
            f" not {type(strategy).__name__}: sharded strategies split the weights that spred factorises."
            " Use `strategy='ddp'`."
        )


def _check_coefficient(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (Real, torch.Tensor))
        or (isinstance(value, torch.Tensor) and value.numel() != 1)
    ):
        raise TypeError(f"`{name}` must be a real number such as 1e-4, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (for example 1e-4), got {value}.")
    return value


def _check_patterns(name: str, patterns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"`{name}` must be a list of name patterns such as ['encoder.*.weight'], got {patterns!r}.")
    return tuple(patterns)
