"""``SpredCallback``: an exact L1 (or group L1) penalty for any LightningModule, added with one callback."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_spred.channels import channel_members
from lightning_spred.checks import (
    check_coefficient,
    check_groups,
    check_modules,
    check_optimizers,
    check_patterns,
    check_strategy,
)
from lightning_spred.diagnostics import ForwardTrace, L2PhaseForecast, dead_terms, degenerate_penalties
from lightning_spred.factorization import Factorization, Member
from lightning_spred.functional import threshold as threshold_tensor
from lightning_spred.groups import FeatureSelection, rank_groups, selected_features
from lightning_spred.lam_max import lam_max_of_batch
from lightning_spred.optimizer_hooks import FactorStepper
from lightning_spred.path import Path, PathPoint, PathRecorder
from lightning_spred.report import SparsityReport, sparsity_report
from lightning_spred.schedules import LamSchedule
from lightning_spred.selection import DEFAULT_MODULES, GroupDim, PenalisedParameter, SelectFn, select_parameters
from lightning_spred.steering import Steering
from lightning_spred.wandb_views import log_layer_views, log_path, write_summary

__all__ = ["SpredCallback"]


class SpredCallback(Callback):
    r"""Train any LightningModule with an exact L1 penalty ``lam * sum|w|`` on the chosen weights.

    Each chosen weight is trained as ``w = u * v`` with weight decay ``lam`` on ``u`` and ``v``, applied as a gradient
    once per optimizer step; the minima are exactly those of ``loss + lam * sum|w|`` (Ziyin & Wang, "spred: Solving
    L1 Penalty with SGD", ICML 2023). With ``groups``, one factor is shared by all entries of a group (a column, a
    row, a channel) and the penalty is the group lasso ``lam * sum_g ||w_g||_2``, which zeroes whole groups.

    With ``nn.MSELoss`` (``1/n ||y - Xw||^2``) a linear model trained with ``SpredCallback(lam)`` has the
    minimiser of scikit-learn's ``Lasso(alpha=lam / 2)`` (whose data term is ``1/(2n) ||y - Xw||^2``).

    The model is never changed structurally: its weights keep their names and ``nn.Parameter`` objects, its
    ``parameters()``, optimizer parameter groups, checkpoints and summaries are those of the plain model. The
    factors live in this callback and take the weights' place inside the optimizer only while it steps (see
    :mod:`lightning_spred.optimizer_hooks`). After every step the weights are ``u * v`` with entries
    ``|w| <= threshold`` (groups: ``||w_g|| <= threshold``) exactly zero, so training, validation, checkpoints and
    the model that leaves ``fit`` all use the sparse weights that are kept.

    Steering ``lam``: it may be a number (changing ``callback.lam`` during fit takes effect at the next step), a
    :class:`~lightning_spred.schedules.LamSchedule` (warm-up, geometric ramp, any function of the step), or left out
    with a target (``target_sparsity`` or ``target_groups``), which raises ``lam`` geometrically from
    ``lam_max * 1e-3`` (slowing down near the target, and never past the stable limit of SGD) until the target is
    met, then holds it, keeping the zeros; a group target keeps the ``k`` groups that leave the path last.
    ``refit_fraction`` ends the fit with an un-penalised fine-tune that keeps the zeros.

    What it logs, through ``LightningModule.log`` so every logger gets it, every ``log_every_n_steps`` steps:
    ``spred/sparsity`` (also in the progress bar), ``spred/sparsity/<name>`` per weight, ``spred/nonzeros``,
    ``spred/penalty``, ``spred/lam`` and ``spred/balance`` (1: the factors are balanced and the penalty acts as L1;
    towards 0: it still acts like L2 decay), and ``spred/groups/<name>`` for grouped weights. With a ``WandbLogger``
    it also logs histograms of ``log10|w|`` and, at the end, a per-layer sparsity chart and the final figures in the
    run summary. When fitting ends, a per-layer table is printed (rank zero) and kept: see :meth:`report`.

    Args:
        lam: the L1 coefficient (``>= 0``), or a schedule; may be left out when a target is given.
        threshold: magnitude at or below which entries (or groups) are exact zeros. Switched-off weights decay
            towards 0 exponentially but never reach it; raise it for short or noisy runs of deep networks (``1e-3``).
        modules: module types whose ``weight`` is penalised (default: ``Linear`` and ``Conv1d/2d/3d``, unless
            ``groups`` is given, in which case only the weights that ``groups`` and ``include`` name are penalised).
        include: name patterns (shell-style, ``*`` matches dots) of further parameters to penalise.
        exclude: name patterns of parameters never penalised.
        select: a function ``(name, module, parameter) -> bool`` that replaces ``modules`` and ``include``.
        lam_overrides: name pattern to a fixed ``lam`` of its own (not scheduled and not steered by a target).
        groups: name pattern to group dimension: ``"input"`` (dim 1: input features of a ``Linear``, input
            channels of a conv), ``"output"`` (dim 0: neurons, filters), an integer dimension, or ``None``.
        target_sparsity: raise ``lam`` until this fraction of the penalised weights is zero, then hold.
        target_groups: raise ``lam`` until at most this many groups are in use, then hold.
        refit_fraction: the fraction of the training steps, at the end, trained without penalty, zeros kept.
        lam_max: the ``lam_max`` that relative schedules and targets scale with; by default it is computed from the
            first training batch (``max_g ||dL/dw_g||`` at ``w_g = 0``, one forward and backward pass per weight).
        record_path: record path points: ``True`` at every validation end (every epoch end without validation),
            an integer ``n`` every ``n`` optimizer steps. Logged as ``spred/path/*`` to every logger, and to W&B
            at the end as a table with a plot of each metric against the groups in use. See :attr:`path` and
            :meth:`restore`.
        path_dir: save the path's snapshots there instead of keeping them in memory.
        verbose: print which parameters are penalised when fitting starts (rank zero only).
        print_report: print the per-layer sparsity table when fitting ends (rank zero only).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument has an invalid value.

    Example:
        >>> callback = SpredCallback(lam=1e-4)
        >>> targeted = SpredCallback(groups={"net.0.weight": "input"}, target_groups=10, refit_fraction=0.2)
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[callback], max_epochs=1, logger=False)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        lam: Union[float, LamSchedule, None] = None,
        *,
        threshold: float = 1e-6,
        modules: Optional[Union[type[nn.Module], Sequence[type[nn.Module]]]] = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        select: Optional[SelectFn] = None,
        lam_overrides: Optional[Mapping[str, float]] = None,
        groups: Optional[Mapping[str, GroupDim]] = None,
        target_sparsity: Optional[float] = None,
        target_groups: Optional[int] = None,
        refit_fraction: float = 0.0,
        lam_max: Optional[float] = None,
        record_path: Union[bool, int] = False,
        path_dir: Optional[str] = None,
        verbose: bool = True,
        print_report: bool = True,
    ) -> None:
        if lam is None and target_sparsity is None and target_groups is None:
            raise ValueError(
                "Give `lam` (a number or a schedule), or a target: `target_sparsity=` or `target_groups=`."
            )
        self.steering = Steering(None, target_sparsity, target_groups, float(refit_fraction))
        self.lam = lam
        self.threshold = check_coefficient("threshold", threshold)
        self.lam_overrides = {
            k: check_coefficient(f"lam_overrides[{k!r}]", v) for k, v in (lam_overrides or {}).items()
        }
        self.groups = check_groups(groups or {})
        self.modules = check_modules(DEFAULT_MODULES if modules is None and not self.groups else modules or ())
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        if select is not None and not callable(select):
            raise TypeError(f"`select` must be a function (name, module, parameter) -> bool, got {select!r}.")
        if select is not None and self.include:
            raise ValueError("Give either `select` or `include`, not both: `select` alone decides when given.")
        self.select = select
        if target_sparsity is not None and target_groups is not None:
            raise ValueError("Give one target: `target_sparsity` or `target_groups`, not both.")
        if target_sparsity is not None and not 0 < check_coefficient("target_sparsity", target_sparsity) < 1:
            raise ValueError(f"`target_sparsity` is a fraction of zero weights in (0, 1), got {target_sparsity}.")
        if target_groups is not None and (isinstance(target_groups, bool) or not isinstance(target_groups, int)):
            raise TypeError(f"`target_groups` must be a whole number of groups, got {target_groups!r}.")
        if target_groups is not None and target_groups < 0:
            raise ValueError(f"`target_groups` must be >= 0, got {target_groups}.")
        if target_groups is not None and not self.groups:
            raise ValueError(
                "`target_groups` counts groups: also give `groups=` (for example {'net.0.weight': 'input'})."
            )
        if not 0 <= check_coefficient("refit_fraction", refit_fraction) < 1:
            raise ValueError(f"`refit_fraction` must be in [0, 1), got {refit_fraction}.")
        self.lam_max = None if lam_max is None else check_coefficient("lam_max", lam_max)
        if not isinstance(record_path, bool) and not (isinstance(record_path, int) and record_path >= 1):
            raise ValueError(f"`record_path` must be True, False or a number of steps >= 1, got {record_path!r}.")
        self.record_path = record_path
        self.path_dir = path_dir
        self.verbose = verbose
        self.print_report = print_report
        self._state_key: Optional[str] = None
        self._terms: list[Factorization] = []
        self._fixed_lam: dict[int, float] = {}
        self._steppers: list[FactorStepper] = []
        self._stash: dict[str, Any] = {}
        self._recorder = PathRecorder(path_dir)
        self._report: Optional[SparsityReport] = None
        self._model: Optional[nn.Module] = None
        self._last_log = self._last_views = -1
        self._trace: Optional[ForwardTrace] = None
        self._forecast: Optional[L2PhaseForecast] = None
        self._dead: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # the optimizer hooks and the forward trace belong to the running fit, not to a copy of the callback
        return {**self.__dict__, "_steppers": [], "_trace": None}

    @property
    def lam(self) -> Union[float, LamSchedule, None]:
        """The L1 coefficient or schedule; setting it during fit takes effect at the next optimizer step."""
        return self.steering.lam

    @lam.setter
    def lam(self, value: Union[float, LamSchedule, None]) -> None:
        self.steering.lam = (
            value if isinstance(value, LamSchedule) or value is None else check_coefficient("lam", value)
        )

    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): built once from the settings
        if self._state_key is None:
            names = [m.__name__ for m in self.modules]
            self._state_key = self._generate_state_key(
                include=self.include, exclude=self.exclude, groups=self.groups, modules=names
            )
        return self._state_key

    @property
    def factorizations(self) -> list[Factorization]:
        """The penalty terms of the current (or last) fit."""
        return list(self._terms)

    @property
    def path(self) -> Path:
        """The recorded path points (see ``record_path``), oldest first."""
        return self._recorder.points

    def report(self) -> SparsityReport:
        """Per-layer parameters, nonzeros, sparsity and compression of the model the last fit returned.

        Raises:
            RuntimeError: no fit with this callback has ended yet.
        """
        if self._report is None:
            raise RuntimeError("No fit with this SpredCallback has ended yet: call `trainer.fit` first.")
        return self._report

    def selected_features(
        self, parameter: Optional[str] = None, names: Optional[Sequence[str]] = None, k: Optional[int] = None
    ) -> FeatureSelection:
        """The groups (input features, neurons, channels) of a grouped weight that are in use.

        Args:
            parameter: name of a weight penalised with ``groups``; may be left out when there is only one.
            names: one name per group (for example gene names, for ``"input"`` groups).
            k: exactly ``k`` groups, the last ``k`` to leave the path (a schedule or target raised ``lam``), else
                the ``k`` with the largest norms.

        Raises:
            RuntimeError: no fit with groups has happened yet.
            ValueError: ``parameter`` is not a grouped weight, or is needed to choose among several.
        """
        grouped = {f.name: f for f in self._terms if f.grouped}
        if not grouped:
            raise RuntimeError(
                "No fit with `groups=` has happened yet: fit with SpredCallback(..., groups={...}) first."
            )
        if parameter is None and len(grouped) > 1:
            raise ValueError(f"Several weights have groups: choose one with `parameter=`, one of {list(grouped)}.")
        parameter = parameter or next(iter(grouped))
        if parameter not in grouped:
            raise ValueError(f"`{parameter}` was not penalised with groups; grouped weights: {list(grouped)}.")
        f = grouped[parameter]
        exit_lam = self._recorder.exit_lam.get(parameter)
        return selected_features(f.weights[0], f.dims[0], names, k, exit_lam, norms=f.norms())

    def restore(self, point: PathPoint, model: Optional[nn.Module] = None) -> None:
        """Load a path point's snapshot into the fitted model (or ``model``).

        Raises:
            RuntimeError: no model to restore into, or the point has no snapshot.
        """
        model = model if model is not None else self._model
        if model is None or point.snapshot is None:
            raise RuntimeError("Nothing to restore: fit with `record_path=` first, or pass `model=`.")
        state = torch.load(point.snapshot) if isinstance(point.snapshot, str) else point.snapshot
        model.load_state_dict(state)

    # ----------------------------------------------------------------------------------------------
    # Overridable choices
    # ----------------------------------------------------------------------------------------------
    def select_parameters(self, pl_module: LightningModule) -> list[PenalisedParameter]:
        """Choose the parameters to penalise; override to choose differently."""
        return select_parameters(
            pl_module,
            modules=self.modules,
            include=self.include,
            exclude=self.exclude,
            select=self.select,
            lam_overrides=self.lam_overrides,
            groups=self.groups,
        )

    def compute_metrics(self) -> dict[str, Tensor]:
        """The values logged during training; override to add or change them.

        Computed from the model's weights, which are the sparse ones (every rank holds the same under DDP).
        """
        metrics: dict[str, Tensor] = {}
        zeros, total, value, balances = 0, 0, 0.0, []
        for f in self._terms:
            for member, weight in zip(f.members, f.weights):
                layer_zeros = int((weight == 0).sum())
                metrics[f"spred/sparsity/{member.path}"] = torch.tensor(layer_zeros / weight.numel())
                zeros, total = zeros + layer_zeros, total + weight.numel()
            norms = f.norms()
            if f.grouped:
                metrics[f"spred/groups/{f.name}"] = (norms > 0).sum().float()
            value += f.lam * float(norms.sum())
            if f.started:
                balances.append(float(f.balance()))
        metrics["spred/nonzeros"] = torch.tensor(float(total - zeros))
        metrics["spred/penalty"] = torch.tensor(value)
        metrics["spred/lam"] = torch.tensor(self._scheduled_lam())
        metrics["spred/balance"] = torch.tensor(sum(balances) / len(balances) if balances else 1.0)
        metrics["spred/sparsity"] = torch.tensor(zeros / max(total, 1))
        metrics["spred/dead_layers"] = torch.tensor(float(len(dead_terms(self._terms))))
        return metrics

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        self._terms, self._model, self._report = [], pl_module, None
        try:
            chosen = self.select_parameters(pl_module)
            if not chosen:
                raise ValueError(self._nothing_to_penalise(pl_module))
            self._check_other_callbacks(trainer, chosen)
            terms = self._build_terms(pl_module, chosen)
            self._terms = [f for f, _ in terms]
            self._fixed_lam = {id(f): p.lam for f, p in terms if p.lam is not None}
            self._check_stash()
            check_optimizers(trainer, trainer.optimizers, self._terms)
        except Exception:
            self._terms = []
            raise
        self._steppers = [
            FactorStepper(opt, self._terms, self._start, lambda: self._set_lam(trainer)) for opt in trainer.optimizers
        ]
        total = int(trainer.estimated_stepping_batches)
        self.steering.begin(total)
        self._trace, self._dead = ForwardTrace(pl_module), set()
        # the forecast judges a fixed lam; schedules and targets move lam themselves
        self._forecast = (
            L2PhaseForecast(total) if isinstance(self.lam, float) and not self.steering.has_target else None
        )
        if self.lam_max is not None:
            self.steering.lam_max = self.lam_max
        self._last_log = self._last_views = trainer.global_step - 1
        self._log_hyperparameters(trainer)
        if self.verbose:
            count = sum(w.numel() for f in self._terms for w in f.weights)
            rank_zero_info(
                f"SpredCallback: penalty on {len(self._terms)} parameters ({count:,} weights):"
                f" {', '.join(f.name for f in self._terms)}"
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.steering.needs_lam_max:
            self.steering.lam_max = lam_max_of_batch(trainer, pl_module, batch, batch_idx, self._scheduled_terms())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._terms:
            return
        scheduled = self._scheduled_terms()
        lam = self._scheduled_lam()
        self._diagnose(trainer)
        if not isinstance(self.lam, float) or self.record_path:  # exits are informative only when lam moves
            self._recorder.track(scheduled, lambda f: f.lam)
        if self.steering.has_target or self.steering.refit_fraction:
            zeros = sum(int((w == 0).sum()) for f in scheduled for w in f.weights)
            total = sum(w.numel() for f in scheduled for w in f.weights)
            norms = [f.norms() for f in scheduled if f.grouped]
            groups = sum(int((n > 0).sum()) for n in norms) if norms else None
            live = [n[n > 0] for n in norms]
            weakest = min((float(n.min()) for n in live if n.numel()), default=None)
            phase = self.steering.observe(trainer.global_step, lam, zeros / max(total, 1), groups, weakest)
            if phase is not None:
                self._enter(phase, trainer)
        if isinstance(self.record_path, int) and not isinstance(self.record_path, bool):
            if trainer.global_step % self.record_path == 0:
                self._record(trainer, pl_module)
        # Computed only when Lightning will write to the loggers (as LearningRateMonitor does), to keep steps cheap.
        if trainer._logger_connector.should_update_logs:
            self._log(pl_module, on_step=True)
            self._last_log = trainer.global_step

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._terms:
            return
        if self.record_path is True and not trainer.val_dataloaders:
            self._record(trainer, pl_module)
        # With short epochs (full-batch training) logging at every epoch end would cost more than the steps: at most
        # every `log_every_n_steps` steps, counting the logs at steps, and at the end.
        every, last = max(trainer.log_every_n_steps, 1), _last_epoch(trainer)
        if (trainer.global_step - self._last_log >= every or last) and self._last_log != trainer.global_step:
            self._last_log = trainer.global_step
            self._log(pl_module, on_step=False)
        if trainer.global_step - self._last_views >= every or last:
            self._last_views = trainer.global_step
            for experiment in _wandb_runs(trainer):
                log_layer_views(experiment, self._named_weights(), trainer.global_step)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._terms and self.record_path is True and not trainer.sanity_checking:
            self._record(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self._terms:
            return
        self._merge()
        if self.steering.has_target and self.steering.reached_step is None:
            capped = self.steering.ramps and self.steering.step_size and self.steering.ramp_lam is not None
            limit = (
                f" `lam` stopped rising at {self.steering.ramp_lam:.3g}, the stable limit of SGD (lam * lr / (1 -"
                " momentum) = 0.5, beyond which every factor collapses whatever the loss): lower the learning rate,"
                " or"
                if capped
                else ""
            )
            rank_zero_warn(
                f"SpredCallback did not reach its target ({self._target_text()}) in {trainer.global_step} steps:"
                f"{limit} train longer, or give a schedule that reaches a larger `lam`.",
                category=UserWarning,
            )
        if self.print_report:
            rank_zero_info(f"SpredCallback: sparsity of the penalised weights\n{self.report()}")
        for experiment in _wandb_runs(trainer):
            write_summary(experiment, self.report())
            log_path(experiment, self.path)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips `teardown` when fit raises or is interrupted: merge here so the user keeps a plain model.
        if self._terms:
            self._merge()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The weights are kept sparse after every step; a weight averaging callback may have put its average here.
        state = checkpoint.get("state_dict", {})
        for f in self._terms:
            for member in f.members:
                if member.path in state and f.started:
                    state[member.path] = threshold_tensor(state[member.path], f.threshold, member.dim)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The state key holds the settings (so that two callbacks can be told apart): a resume with other settings
        # finds the one SpredCallback state of the checkpoint by its class, and says what changed at fit start.
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return
        mine = [key for key in states if key.startswith(f"{type(self).__qualname__}{{")]
        if len(mine) == 1:
            self.load_state_dict(states[mine[0]])

    def state_dict(self) -> dict[str, Any]:
        factors = {f.name: f.state() for f in self._terms if f.started}
        unstarted = {name: value for name, value in self._stash.items() if name not in factors}
        return {
            "factors": {**unstarted, **factors},
            "steering": self.steering.state_dict(),
            "path": self._recorder.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied when each term starts: the factors are created at its first optimizer step.
        self._stash = dict(state_dict.get("factors", {}))
        self.steering.load_state_dict(state_dict.get("steering", {}))
        self._recorder.load_state_dict(state_dict.get("path", {}))

    # ----------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------
    def _build_terms(
        self, model: nn.Module, chosen: list[PenalisedParameter]
    ) -> list[tuple[Factorization, PenalisedParameter]]:
        """One penalty term per chosen parameter; a channel group also takes its bias and BatchNorm."""
        terms, covered = [], set()
        for p in chosen:
            if id(p.module._parameters[p.name]) in covered:
                continue  # already in the channel group of the layer before it
            if p.channel:
                members = channel_members(model, p.path.rpartition(".")[0], p.module)
            else:
                members = [Member(p.module, p.name, p.path, p.dim)]
            covered |= {id(m.weight) for m in members}
            terms.append((Factorization(members, self._lam_of(p), self.threshold), p))
        return terms

    def _lam_of(self, parameter: PenalisedParameter) -> float:
        if parameter.lam is not None:
            return parameter.lam
        return self.lam if isinstance(self.lam, float) else 0.0  # a schedule sets it before every step

    def _scheduled_terms(self) -> list[Factorization]:
        """The terms that follow ``lam`` (all but those with a fixed ``lam_overrides`` coefficient)."""
        return [f for f in self._terms if id(f) not in self._fixed_lam]

    def _set_lam(self, trainer: Trainer) -> None:
        # read at every optimizer step, so that a `lam` changed at any time before the step counts for it
        sizes = [f.step_size for f in self._scheduled_terms() if f.step_size]
        self.steering.step_size = max(sizes, default=None)
        lam = self.steering.value(trainer.global_step, trainer.current_epoch)
        refit = self.steering.phase == "refit"
        for f in self._terms:
            f.lam = 0.0 if refit else self._fixed_lam.get(id(f), lam)

    def _scheduled_lam(self) -> float:
        scheduled = self._scheduled_terms()
        return scheduled[0].lam if scheduled else 0.0

    def _start(self, f: Factorization) -> None:
        saved = self._stash.pop(f.name, None)
        if saved is None:
            f.start()
            return
        f.start((saved["u"], saved["v"]))
        f.optimizer_state = saved.get("optimizer")

    def _check_stash(self) -> None:
        shapes = {f.name: [tuple(w.shape) for w in f.weights] for f in self._terms}
        for name, saved in self._stash.items():
            if name in shapes and [tuple(u.shape) for u in saved["u"]] != shapes[name]:
                raise ValueError(
                    f"The checkpoint's spred factors for `{name}` have shapes {[tuple(u.shape) for u in saved['u']]}"
                    f" but the model's weights have {shapes[name]}: the model changed since the checkpoint was"
                    " written. Resume with the same model, or load the checkpoint's weights and fit without"
                    " `ckpt_path`."
                )
        gone = sorted(set(self._stash) - set(shapes))
        new = sorted(set(shapes) - set(self._stash)) if self._stash else []
        if gone or new:
            rank_zero_warn(
                f"Resuming with a different choice of penalised weights: no longer penalised {gone or 'none'}, newly"
                f" penalised {new or 'none'} (these start from the checkpoint's weights). If this is not what you"
                " meant, resume with the `include`/`exclude`/`groups` the checkpoint was written with.",
                category=UserWarning,
            )
            for name in gone:
                del self._stash[name]

    def _check_other_callbacks(self, trainer: Trainer, chosen: list[PenalisedParameter]) -> None:
        mine = {id(p.module._parameters[p.name]): p.path for p in chosen}
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, SpredCallback):
                continue
            shared = [mine[id(w)] for f in other._terms for w in f.weights if id(w) in mine]
            if shared:
                raise ValueError(
                    f"Two SpredCallbacks penalise {shared}: give each its own parameters (`include`/`exclude`), or"
                    " use one callback with `lam_overrides` for different coefficients."
                )

    def _enter(self, phase: str, trainer: Trainer) -> None:
        # Entering hold or refit, zeros stay zero (their factors and moments are zeroed). A group target keeps the
        # `k` groups that left the path last: those in use, and the ones that just left (a rising lam switches
        # groups off with a lag, so the count can fall past `k` in one step): they can grow back, the others not.
        target_groups = self.steering.target_groups
        if phase == "hold":
            if target_groups is not None:
                self._keep_last_groups(target_groups)
            else:
                self._keep_zeros(self._scheduled_terms())
        elif target_groups is None or self.steering.reached_step is None:  # refit (after a group hold: kept already)
            self._keep_zeros(self._terms)
        rank_zero_info(f"SpredCallback: step {trainer.global_step}, {phase} phase ({self._target_text()}).")

    @staticmethod
    def _keep_zeros(terms: Sequence[Factorization]) -> None:
        for f in terms:
            if f.started:
                f.keep_zeros()

    def _keep_last_groups(self, k: int) -> None:
        terms = [f for f in self._scheduled_terms() if f.grouped and f.started]
        exits = [self._recorder.exit_lam.get(f.name, torch.full_like(f.norms(), math.inf)) for f in terms]
        norms = torch.cat([f.factor_norms().cpu() for f in terms])
        order = rank_groups(norms, torch.cat([e.cpu() for e in exits]))
        kept = torch.zeros(len(norms), dtype=torch.bool)
        kept[order[:k]] = True
        for f, mask in zip(terms, kept.split([len(e) for e in exits])):
            f.keep_zeros(~mask.to(f.v.device))

    def _target_text(self) -> str:
        if self.steering.target_sparsity is not None:
            return f"target_sparsity={self.steering.target_sparsity}"
        if self.steering.target_groups is not None:
            return f"target_groups={self.steering.target_groups}"
        return f"refit_fraction={self.steering.refit_fraction}"

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        point = self._recorder.record(
            pl_module,
            trainer.global_step,
            trainer.current_epoch,
            self._scheduled_lam(),
            self._terms,
            dict(trainer.callback_metrics),
        )
        values = {"spred/path/lam": point.lam, "spred/path/nonzeros": float(point.nonzeros)}
        values.update({f"spred/path/groups/{name}": float(count) for name, count in point.groups.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _diagnose(self, trainer: Trainer) -> None:
        if self._trace is not None and self._trace.done:
            for message in degenerate_penalties(self._trace, self._terms, trainer.optimizers):
                rank_zero_warn(message, category=UserWarning)
            self._trace.stop()
            self._trace = None
        forecast = self._forecast
        if forecast is not None and not forecast.done:
            if forecast.first is None or trainer.global_step >= forecast.check_step:
                started = [f for f in self._terms if f.started]
                balance = sum(float(f.balance()) for f in started) / len(started) if started else 1.0
                message = forecast.observe(trainer.global_step, balance)
                if message:
                    rank_zero_warn(message, category=UserWarning)

    def _merge(self) -> None:
        if self._trace is not None:
            self._trace.stop()
            self._trace = None
        self._detach()
        for f in self._terms:
            if f.started:
                f.zero_small()  # the weights are sparse already, unless weight averaging just replaced them
        self._report = sparsity_report(self._named_weights())

    def _detach(self) -> None:
        for stepper in self._steppers:
            stepper.detach()
        self._steppers = []

    def _named_weights(self) -> list[tuple[str, Tensor]]:
        return [(m.path, m.weight) for f in self._terms for m in f.members]

    def _log(self, pl_module: LightningModule, on_step: bool) -> None:
        for name in sorted(set(dead_terms(self._terms)) - self._dead):
            self._dead.add(name)
            rank_zero_warn(
                f"Every weight of `{name}` is zero at step {pl_module.global_step}: the layer is dead (its output is"
                " constant). Lower `lam` (or give this weight its own with `lam_overrides`), or exclude it.",
                category=UserWarning,
            )
        metrics = self.compute_metrics()
        sparsity = metrics.pop("spred/sparsity")
        # The headline figure goes through `self.log` (progress bar, `callback_metrics` for monitors); the others
        # straight to the loggers, as LearningRateMonitor does: `self.log` costs about a millisecond per key, more
        # than a step of a small full-batch model.
        pl_module.log("spred/sparsity", sparsity, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        trainer = pl_module.trainer
        values = {key: float(value) for key, value in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _log_hyperparameters(self, trainer: Trainer) -> None:
        lam = self.lam.hparams() if isinstance(self.lam, LamSchedule) else self.lam
        values = {
            "spred/lam": lam,
            "spred/threshold": self.threshold,
            "spred/groups": dict(self.groups),
            "spred/lam_overrides": dict(self.lam_overrides),
            "spred/target_sparsity": self.steering.target_sparsity,
            "spred/target_groups": self.steering.target_groups,
            "spred/refit_fraction": self.steering.refit_fraction,
            "spred/penalised": [f.name for f in self._terms],
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(values)

    def _nothing_to_penalise(self, pl_module: LightningModule) -> str:
        return (
            f"SpredCallback found nothing to penalise in {type(pl_module).__name__}: no `weight` of"
            f" {[m.__name__ for m in self.modules]} and no parameter matching `include`/`groups`"
            + (f" outside `exclude={list(self.exclude)}`" if self.exclude else "")
            + ". Choose parameters with `modules=`, `include=[...]`, `groups=` or `select=`."
        )


def _last_epoch(trainer: Trainer) -> bool:
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    return (
        trainer.should_stop
        or (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs)
        or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps)
    )


def _wandb_runs(trainer: Trainer) -> list[Any]:
    """The W&B runs of the trainer's WandbLoggers, on rank zero only (other ranks have no real run)."""
    return [
        logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger) and trainer.is_global_zero
    ]
