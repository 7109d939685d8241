"""``SpredCallback``: an exact L1 (or group L1) penalty for any LightningModule, added with one callback.

The callback is Lightning glue: the penalty terms (:mod:`~lightning_spred.terms`) hold the factors, the controller
(:mod:`~lightning_spred.steering`) says what ``lam`` is and what a target prunes, the optimizer hooks
(:mod:`~lightning_spred.optimizer_hooks`) train the factors inside each step, and :mod:`~lightning_spred.loggers` shows
it. Each hook below is a few lines that call them at the right time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_spred.census import Census
from lightning_spred.checks import check_coefficient, check_optimizers, check_strategy, training_budget
from lightning_spred.diagnostics import FixedLamForecast, absorbed_terms, degenerate_penalties
from lightning_spred.factorization import Factorization
from lightning_spred.features import FeatureSelection, selected_features
from lightning_spred.group_kinds import GroupSpec
from lightning_spred.lam_max import lam_max_of_batch
from lightning_spred.loggers import SpredLogging
from lightning_spred.optimizer_hooks import FactorStepper
from lightning_spred.path import PathPoint, PathRecorder, RegularizationPath
from lightning_spred.report import SparsityReport, sparsity_report
from lightning_spred.results import FitResults
from lightning_spred.resume import SavedTerms
from lightning_spred.scales import AbsorbedScale, find_absorbed, restore_norms
from lightning_spred.schedules import LamSchedule
from lightning_spred.selection import PenalisedParameter, SelectFn, Selection
from lightning_spred.steering import Phase, Steering
from lightning_spred.targets import Target
from lightning_spred.terms import PenaltyTerms
from lightning_spred.trace import ForwardTrace

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
    factors live in this callback and take the weights' place inside the optimizer only while it steps. After every
    step the weights are ``u * v`` with entries ``|w| <= threshold`` (groups: ``||w_g|| <= threshold``) exactly
    zero, so training, validation, checkpoints and the model that leaves ``fit`` use the sparse weights that are kept.

    Steering ``lam``: a number (changing ``callback.lam`` during fit takes effect at the next step), a
    :class:`~lightning_spred.schedules.LamSchedule`, or a :class:`~lightning_spred.targets.Target` (or the keywords
    ``target_sparsity`` / ``target_groups``): the count follows gradual pruning's cubic schedule to the target over
    the first two thirds of the steps, tracked with feedback on ``lam`` and by pruning spred's smallest weights where
    the count lags; the last third trains the plain weights within the zeros. ``refit_fraction`` sets that last part
    (and ends any fit with such a refit).

    What it logs, through ``LightningModule.log`` so every logger gets it, every ``log_every_n_steps`` steps: see
    :meth:`compute_metrics` and :mod:`lightning_spred.loggers`. When fitting ends, a per-layer table is printed
    (rank zero) and kept: see :meth:`report`.

    Args:
        lam: the L1 coefficient (``>= 0``), a schedule, or a :class:`~lightning_spred.targets.Target`; with a target,
            a number is where ``lam`` starts.
        target: a :class:`~lightning_spred.targets.Target`, beside a starting ``lam`` (or give the target keywords).
        selection: a :class:`~lightning_spred.selection.Selection` of the parameters to penalise (or give its
            keywords: ``modules``, ``include``, ``exclude``, ``select``, ``lam_overrides``, ``groups``).
        threshold: magnitude at or below which entries (or groups) are exact zeros. Switched-off weights decay
            towards 0 exponentially but never reach it; raise it for short or noisy runs of deep networks (``1e-3``).
        modules: module types whose projection weights are penalised (default: ``Linear``, ``Conv1d/2d/3d``,
            ``nn.MultiheadAttention``'s projections and Hugging Face's ``Conv1D``; embeddings never, tied or not;
            with ``groups`` only what ``groups`` and ``include`` name).
        include: name patterns (shell-style, ``*`` matches dots) of further parameters to penalise.
        exclude: name patterns of parameters never penalised.
        select: a function ``(name, module, parameter) -> bool`` that replaces ``modules`` and ``include``.
        lam_overrides: name pattern to a fixed ``lam`` of its own (not scheduled and not steered by a target).
        groups: name pattern to group kind: ``"input"`` (input features), ``"output"`` (neurons, filters),
            ``"channel"`` (output units with the layer's bias and the BatchNorm after it), ``"head"`` / ``"neuron"`` /
            ``"rank"`` (for a pattern naming an attention, a feed-forward block or a LoRA layer: its heads, neurons or
            ranks across all their tensors), a dimension index, or ``None`` (see :mod:`lightning_spred.group_kinds`).
        target_sparsity: the fraction of the penalised entries (grouped weights: groups) to make zero.
        target_groups: the number of groups (features, neurons, channels, heads) to keep.
        refit_fraction: the fraction of the steps, at the end, that train the plain weights without penalty within
            the zeros (default: a third with a target, else none).
        lam_max: the ``lam_max`` that relative schedules and targets scale with; by default it is computed from the
            first training batch (one forward and backward pass per weight).
        total_steps: the optimizer steps of the fit, for targets, relative schedules and refits when the trainer
            cannot tell (an ``IterableDataset`` without ``max_steps``, ``max_time``).
        check_every: see :class:`~lightning_spred.targets.Target`.
        layer_floor: see :class:`~lightning_spred.targets.Target`.
        prune_by: see :class:`~lightning_spred.targets.Target`.
        restore_scales: when a refit begins, multiply each penalised layer whose output goes straight into a
            normalisation (a conv before a BatchNorm) back to its norm when penalising began, with the
            normalisation's running statistics: the penalty shrinks such layers at no cost to the loss, and a refit
            at the shrunk scale takes steps far larger than the optimizer was set for (see
            :mod:`lightning_spred.scales`). The function is unchanged, up to the normalisation's ``eps``.
        record_path: record path points: ``True`` at every validation end (every epoch end without validation),
            an integer ``n`` every ``n`` optimizer steps. See :attr:`path` and :meth:`restore`.
        path_dir: save the path's snapshots there instead of keeping them in memory (needs ``record_path``).
        verbose: print which parameters are penalised when fitting starts (rank zero only).
        print_report: print the per-layer sparsity table when fitting ends (rank zero only).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument has an invalid value, or arguments do not go together.

    Example:
        >>> callback = SpredCallback(lam=1e-4)
        >>> targeted = SpredCallback(Target(groups=10), groups={"net.0.weight": "input"})
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[callback], max_epochs=1, logger=False)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        lam: Union[float, LamSchedule, Target, None] = None,
        *,
        target: Optional[Target] = None,
        selection: Optional[Selection] = None,
        threshold: float = 1e-6,
        modules: Optional[Union[type[nn.Module], Sequence[type[nn.Module]]]] = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        select: Optional[SelectFn] = None,
        lam_overrides: Optional[Mapping[str, float]] = None,
        groups: Optional[Mapping[str, GroupSpec]] = None,
        target_sparsity: Optional[float] = None,
        target_groups: Optional[int] = None,
        refit_fraction: Optional[float] = None,
        lam_max: Optional[float] = None,
        total_steps: Optional[int] = None,
        check_every: int = 10,
        layer_floor: float = 0.1,
        prune_by: Optional[str] = None,
        restore_scales: bool = True,
        record_path: Union[bool, int] = False,
        path_dir: Optional[str] = None,
        verbose: bool = True,
        print_report: bool = True,
    ) -> None:
        self.threshold = check_coefficient("threshold", threshold)
        self.selection = _selection(selection, modules, include, exclude, select, lam_overrides, groups)
        if isinstance(lam, Target):
            if target is not None:
                raise ValueError("Give the target once: as `lam` or as `target=`, not both.")
            lam, target = None, lam
        target = _target(target, target_sparsity, target_groups, check_every, layer_floor, prune_by, self.selection)
        if lam is not None and not isinstance(lam, LamSchedule):
            lam = check_coefficient("lam", lam)
        self.steering = Steering(lam, target, refit_fraction, self.threshold)
        self.lam_max = None if lam_max is None else check_coefficient("lam_max", lam_max)
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"`total_steps` must be a number of optimizer steps >= 1, got {total_steps!r}.")
        self.total_steps = total_steps
        if not isinstance(record_path, bool) and not (isinstance(record_path, int) and record_path >= 1):
            raise ValueError(f"`record_path` must be True, False or a number of steps >= 1, got {record_path!r}.")
        if path_dir is not None and not record_path:
            raise ValueError("`path_dir` is where the path's snapshots go: give `record_path=True` (or a step count).")
        self.record_path = record_path
        if not isinstance(restore_scales, bool):
            raise TypeError(f"`restore_scales` must be True or False, got {restore_scales!r}.")
        self.restore_scales = restore_scales
        self.verbose = verbose
        self.print_report = print_report
        self._state_key: Optional[str] = None
        self._terms = PenaltyTerms()
        self._saved = SavedTerms()
        self._resumed = False
        self._steppers: list[FactorStepper] = []
        self._recorder = PathRecorder(path_dir)
        self._logging = SpredLogging()
        self._results = FitResults()
        self._model: Optional[nn.Module] = None
        self._trace: Optional[ForwardTrace] = None
        self._forecast: Optional[FixedLamForecast] = None
        self._dead: set[str] = set()
        self._scales: list[AbsorbedScale] = []

    def __getstate__(self) -> dict[str, Any]:
        # the optimizer hooks and the forward trace belong to the running fit, not to a copy of the callback
        return {**self.__dict__, "_steppers": [], "_trace": None}

    # ---------------------------------------------------------------------------------------------- public API
    @property
    def lam(self) -> Union[float, LamSchedule, None]:
        """The L1 coefficient or schedule; setting it during fit takes effect at the next optimizer step."""
        return self.steering.lam

    @lam.setter
    def lam(self, value: Union[float, LamSchedule, None]) -> None:
        if isinstance(value, LamSchedule) and self.steering.has_target:
            raise ValueError("A target steers `lam` itself: a schedule cannot replace it.")
        self.steering.lam = (
            value if isinstance(value, LamSchedule) or value is None else check_coefficient("lam", value)
        )

    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): built once from the settings
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self.selection.hparams())
        return self._state_key

    @property
    def factorizations(self) -> list[Factorization]:
        """The penalty terms of the current (or last) fit."""
        return list(self._terms)

    @property
    def path(self) -> RegularizationPath:
        """The recorded path points (see ``record_path``), oldest first."""
        self._take_over()
        return self._recorder.points

    def report(self) -> SparsityReport:
        """Per-layer parameters, nonzeros, sparsity and compression of the model the last fit returned.

        Raises:
            RuntimeError: no fit with this callback has ended yet.
        """
        self._take_over()
        if self._results.report is None:
            raise RuntimeError(
                "No fit with this SpredCallback has ended yet: call `trainer.fit` first. (Under `strategy='ddp_spawn'`"
                " the results come back when rank zero's fit ends; an interrupted worker leaves none.)"
            )
        return self._results.report

    def selected_features(
        self, parameter: Optional[str] = None, names: Optional[Sequence[str]] = None, k: Optional[int] = None
    ) -> FeatureSelection:
        """The groups (input features, neurons, channels) of a grouped weight that are in use.

        Args:
            parameter: name of a weight penalised with ``groups``; may be left out when there is only one.
            names: one name per group (for example gene names, for ``"input"`` groups).
            k: exactly ``k`` groups: the last ``k`` to leave the path (by ``lam``, then by step), else the ``k`` with
                the largest norms.

        Raises:
            RuntimeError: no fit with groups has happened yet.
            ValueError: ``parameter`` is not a grouped weight, or is needed to choose among several.
        """
        self._take_over()
        grouped = self._results.norms or {f.name: (f.dims[0], f.norms()) for f in self._terms if f.grouped}
        if not grouped:
            raise RuntimeError(
                "No fit with `groups=` has happened yet: fit with SpredCallback(..., groups={...}) first."
            )
        if parameter is None and len(grouped) > 1:
            raise ValueError(f"Several weights have groups: choose one with `parameter=`, one of {list(grouped)}.")
        parameter = parameter or next(iter(grouped))
        if parameter not in grouped:
            raise ValueError(f"`{parameter}` was not penalised with groups; grouped weights: {list(grouped)}.")
        dim, norms = grouped[parameter]
        exits, steps = self._recorder.exit_lam.get(parameter), self._recorder.exit_step.get(parameter)
        return selected_features(None, dim, names, k, exits, norms=norms, exit_step=steps)

    def restore(self, point: PathPoint, model: Optional[nn.Module] = None) -> None:
        """Load a path point's snapshot into the fitted model (or ``model``).

        Raises:
            RuntimeError: no model to restore into, or the point has no snapshot.
        """
        model = model if model is not None else self._model
        if model is None or point.snapshot is None:
            raise RuntimeError("Nothing to restore: fit with `record_path=` first, or pass `model=`.")
        state = torch.load(point.snapshot, weights_only=True) if isinstance(point.snapshot, str) else point.snapshot
        model.load_state_dict(state)

    # ---------------------------------------------------------------------------------------------- overridable
    def select_parameters(self, pl_module: LightningModule) -> list[PenalisedParameter]:
        """Choose the parameters to penalise (:meth:`Selection.choose`); override to choose differently."""
        return self.selection.choose(pl_module)

    def compute_metrics(self, census: Optional[Census] = None) -> dict[str, Tensor]:
        """The values logged during training, as tensors on the weights' device; override to add or change them.

        Args:
            census: the reading of the terms to log (default: a new one). Every rank holds the same weights under DDP.
        """
        census = census or self._terms.census()
        counted = [i for i, started in enumerate(census.member_started) if started]  # frozen weights are not counted
        metrics = {
            f"spred/sparsity/{census.members[i]}": census.member_zeros[i] / census.member_sizes[i] for i in counted
        }
        metrics.update(
            {
                f"spred/groups/{name}": n
                for name, n, grouped in zip(census.terms, census.in_use, census.grouped)
                if grouped
            }
        )
        started = torch.tensor(census.started, device=census.balance.device)
        total = max(sum(census.member_sizes[i] for i in counted), 1)
        zeros = census.member_zeros[counted].sum()
        metrics["spred/nonzeros"] = total - zeros
        metrics["spred/penalty"] = census.penalty.sum()
        metrics["spred/lam"] = torch.tensor(self.steering.current_lam)
        count = started.sum()
        metrics["spred/balance"] = torch.where(count > 0, (census.balance * started).sum() / count.clamp_min(1), 1.0)
        metrics["spred/sparsity"] = zeros / total
        metrics["spred/dead_layers"] = ((census.in_use == 0) & started).sum()
        return metrics

    # ---------------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer)
            self._recorder.check_directory()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        self._terms, self._model = PenaltyTerms(), pl_module
        self._results.clear()
        terms = self._build(trainer, pl_module)
        total = self._plan(trainer, pl_module, terms)
        self._terms = terms  # from here on the fit is penalised: every check above raised before it
        self._attach(trainer, pl_module, total)
        self._logging.begin(trainer)
        SpredLogging.hyperparameters(trainer, self._hyperparameters())
        if self.verbose:
            rank_zero_info(self._describe_terms())

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        wanted = self._forecast is not None and self._forecast.wants_lam_max and pl_module.automatic_optimization
        if self.steering.needs_lam_max or wanted:
            terms = self._terms.scheduled
            self.steering.lam_max = lam_max_of_batch(trainer, pl_module, batch, batch_idx, terms, self._absorbed)
        if wanted:
            for message in self._forecast.judge_lam_max(self.steering.lam_max):  # type: ignore[union-attr,arg-type]
                rank_zero_warn(message, category=UserWarning)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._terms:
            return
        step = trainer.global_step
        self._diagnose(trainer)
        if self.steering.relative or self.steering.has_target or not isinstance(self.lam, float) or self.record_path:
            self._recorder.track(self._terms.scheduled, step)  # exits are informative only when lam moves
        refitting = self.steering.phase is Phase.REFIT
        self.steering.observe(step, self._terms)
        if self.steering.phase is Phase.REFIT and not refitting and self._scales:
            self._restore_scales(step)
        if self.record_path is not True and self.record_path and step % self.record_path == 0:
            self._record(trainer, pl_module)
        self._logging.after_step(trainer, pl_module, self._metrics)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._terms:
            return
        if self.record_path is True and not trainer.val_dataloaders:
            self._record(trainer, pl_module)
        self._logging.at_epoch_end(trainer, pl_module, self._metrics, self._terms.named_weights, _last_epoch(trainer))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._recorder.validation_starts(trainer.callback_metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._terms and not trainer.sanity_checking:
            self._recorder.validated(trainer.global_step, trainer.callback_metrics)
            if self.record_path is True:
                self._record(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self._terms:
            return
        self._finish()
        if self.print_report:
            rank_zero_info(f"SpredCallback: sparsity of the penalised weights\n{self.report()}")
        SpredLogging.at_end(trainer, self.report(), self.path)
        if trainer.is_global_zero and self._results.in_spawned_worker():
            self._results.hand_off({"path": self._recorder.state_dict(), "steering": self.steering.state_dict()})

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips `teardown` when fit raises or is interrupted: finish here so the user keeps a plain model.
        if self._terms:
            self._finish()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The weights are kept sparse after every step; a weight averaging callback may have put its average here.
        state = checkpoint.get("state_dict", {})
        for f in self._terms:
            if f.started and f.zero_every_step:
                f.zero_small_in(state)

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
        return {
            "factors": self._saved.state_dict(self._terms),
            "steering": self.steering.state_dict(),
            "path": self._recorder.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied when each term starts: the factors are created at its first optimizer step.
        self._saved.load(state_dict.get("factors", {}))
        self.steering.load_state_dict(state_dict.get("steering", {}))
        self._recorder.load_state_dict(state_dict.get("path", {}))
        self._resumed = True

    # ---------------------------------------------------------------------------------------------- internals
    def _build(self, trainer: Trainer, pl_module: LightningModule) -> PenaltyTerms:
        """The penalty terms, checked against the model, the other callbacks and the optimizers."""
        chosen = self.select_parameters(pl_module)
        if not chosen:
            raise ValueError(self._nothing_to_penalise(pl_module))
        self._check_other_callbacks(trainer, chosen)
        terms = PenaltyTerms.build(chosen, self.threshold)
        self._saved.check(terms)
        check_optimizers(trainer, trainer.optimizers, terms)
        return terms

    def _plan(self, trainer: Trainer, pl_module: LightningModule, terms: PenaltyTerms) -> Optional[int]:
        """The fit's budget and the controller's fresh (or resumed) state; raises before training if it cannot."""
        total = training_budget(trainer, self.total_steps, self.steering.needs_budget)
        if self.steering.needs_lam_max and self.lam_max is None and not pl_module.automatic_optimization:
            raise ValueError(
                "SpredCallback computes `lam_max` from a training step, which manual optimization cannot run without"
                " stepping: give `lam_max=`, or an absolute `lam` (with a target: where it starts)."
            )
        if self.lam_max is not None:
            self.steering.lam_max = self.lam_max
        self.steering.begin(total, terms, resumed=self._resumed)
        if not self._resumed:
            self._recorder.reset()
            self._saved.load({})
        self._resumed = False
        return total

    def _attach(self, trainer: Trainer, pl_module: LightningModule, total: Optional[int]) -> None:
        """The optimizer hooks, the forward trace and, for a fixed ``lam``, its forecast."""
        # led by magnitude, a target starts from the model's own dynamics (u = w, v = 1: near balance the effective
        # learning rate of w is 2|w| times the optimizer's, which slows a network down for the whole schedule)
        target = self.steering.target
        scale = 1.0 if target is not None and target.prune_by == "magnitude" else None
        self._steppers = [
            FactorStepper(opt, self._terms, self.steering, self._saved, trainer, scale) for opt in trainer.optimizers
        ]
        self._trace, self._dead, self._scales = ForwardTrace(pl_module), set(), []
        fixed = isinstance(self.lam, float) and not self.steering.has_target  # schedules and targets move lam
        self._forecast = FixedLamForecast(self.steering, total, threshold=self.threshold) if fixed else None
        if self._forecast is not None and self.lam_max is not None:
            for message in self._forecast.judge_lam_max(self.lam_max):
                rank_zero_warn(message, category=UserWarning)

    def _check_other_callbacks(self, trainer: Trainer, chosen: list[PenalisedParameter]) -> None:
        mine = {id(p.parameter): p.name for p in chosen}
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, SpredCallback):
                continue
            shared = [mine[id(w)] for f in other._terms for w in f.weights if id(w) in mine]
            if shared:
                raise ValueError(
                    f"Two SpredCallbacks penalise {shared}: give each its own parameters (`include`/`exclude`), or"
                    " use one callback with `lam_overrides` for different coefficients."
                )

    def _absorbed(self) -> set[str]:
        return absorbed_terms(self._trace, self._terms) if self._trace is not None and self._trace.done else set()

    def _metrics(self) -> dict[str, Tensor]:
        census = self._terms.census()
        for name in census.host().dead:
            if name not in self._dead:
                self._dead.add(name)
                rank_zero_warn(
                    f"Every weight of `{name}` is zero at step {self._model.global_step}: the layer is dead (its"  # type: ignore[union-attr]
                    " output is constant). Lower `lam` (or give this weight its own with `lam_overrides`), exclude"
                    " it, or steer with a target (its layers keep a floor).",
                    category=UserWarning,
                )
        return self.compute_metrics(census)

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        census = self._terms.census().host()
        point = self._recorder.record(
            pl_module,
            trainer.global_step,
            trainer.current_epoch,
            self.steering.current_lam,
            census,
            self._recorder.current_metrics(trainer.global_step, trainer.callback_metrics),
            at_limit=self.steering.at_limit,
        )
        SpredLogging.path_point(trainer, point)

    def _diagnose(self, trainer: Trainer) -> None:
        if self._trace is not None and self._trace.done:
            for message in degenerate_penalties(self._trace, self._terms, trainer.optimizers):
                rank_zero_warn(message, category=UserWarning)
            if self.restore_scales and self.steering.refit_step is not None:
                self._scales = find_absorbed(self._trace, self._terms)
            self._trace.stop()
            self._trace = None
        forecast = self._forecast
        if forecast is not None and not forecast.done:
            if forecast.first is None or trainer.global_step >= forecast.check_step:
                for message in forecast.observe(trainer.global_step, self._terms):
                    rank_zero_warn(message, category=UserWarning)

    def _restore_scales(self, step: int) -> None:
        factors = [f for f in restore_norms(self._scales).tolist() if f > 1]  # once per fit: the refit has just begun
        if factors:
            rank_zero_info(
                f"SpredCallback: step {step}, {len(factors)} layers that a normalisation follows multiplied back to"
                f" their norm when penalising began (by {min(factors):.3g}-{max(factors):.3g}): the same function, and"
                " the refit's steps the size the optimizer was set for (`restore_scales=False` leaves them shrunk)."
            )

    def _finish(self) -> None:
        """End of fit (also on exception): hooks removed, weights thresholded, results kept for the user."""
        if self._trace is not None:
            self._trace.stop()
            self._trace = None
        self._detach()
        self._terms.zero_small()  # the weights are sparse already, unless weight averaging just replaced them
        self._results.keep(sparsity_report(self._terms.named_weights()), self._terms)

    def _detach(self) -> None:
        for stepper in self._steppers:
            stepper.detach()
        self._steppers = []

    def _hyperparameters(self) -> dict[str, Any]:
        lam = self.lam.hparams() if isinstance(self.lam, LamSchedule) else self.lam
        target = self.steering.target.target.hparams() if self.steering.target is not None else {}
        return {
            "spred/lam": lam,
            "spred/threshold": self.threshold,
            "spred/groups": dict(self.selection.groups),
            "spred/lam_overrides": dict(self.selection.lam_overrides),
            **{f"spred/{key}": value for key, value in target.items()},
            "spred/refit_fraction": self.steering.effective_refit_fraction,
            "spred/restore_scales": self.restore_scales,
            "spred/penalised": [f.name for f in self._terms],
        }

    def _describe_terms(self) -> str:
        trainable = [f for f in self._terms if f.trainable]
        count = sum(w.numel() for f in trainable for w in f.weights)
        names = ", ".join(f.name for f in trainable)
        frozen = len(self._terms) - len(trainable)
        terms = f"{len(trainable)} term" + ("" if len(trainable) == 1 else "s")
        return f"SpredCallback: penalty on {terms} ({count:,} weights): {names}" + (
            f"; {frozen} frozen terms are penalised (and counted) only if they train" if frozen else ""
        )

    def _nothing_to_penalise(self, pl_module: LightningModule) -> str:
        selection = self.selection
        return (
            f"SpredCallback found nothing to penalise in {type(pl_module).__name__}: no projection weight of"
            f" {[m.__name__ for m in selection.modules]} and no parameter matching `include`/`groups`"
            + (f" outside `exclude={list(selection.exclude)}`" if selection.exclude else "")
            + ". Choose parameters with `modules=`, `include=[...]`, `groups=` or `select=`."
        )

    def _take_over(self) -> None:
        """In the script that launched a ``ddp_spawn`` fit: the results rank zero left."""
        state = self._results.take_over()
        if state is not None:
            self._recorder.load_state_dict(state["path"])
            self.steering.load_state_dict(state["steering"])


def _last_epoch(trainer: Trainer) -> bool:
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    return (
        trainer.should_stop
        or (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs)
        or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps)
    )


def _selection(
    selection: Optional[Selection],
    modules: Optional[Union[type[nn.Module], Sequence[type[nn.Module]]]],
    include: Sequence[str],
    exclude: Sequence[str],
    select: Optional[SelectFn],
    lam_overrides: Optional[Mapping[str, float]],
    groups: Optional[Mapping[str, GroupSpec]],
) -> Selection:
    """The given ``Selection``, or one built from its keywords (not both)."""
    keywords = dict(modules=modules, include=include, exclude=exclude, select=select, lam_overrides=lam_overrides)
    if selection is None:
        return Selection(**keywords, groups=groups)  # type: ignore[arg-type]
    if not isinstance(selection, Selection):
        raise TypeError(f"`selection` must be a lightning_spred.Selection, got {selection!r}.")
    given = [k for k, v in {**keywords, "groups": groups}.items() if v not in (None, ())]
    if given:
        raise ValueError(f"Give the parameters to penalise once: `selection=` or {given}, not both.")
    return selection


def _target(
    target: Optional[Target],
    sparsity: Optional[float],
    groups: Optional[int],
    check_every: int,
    layer_floor: float,
    prune_by: Optional[str],
    selection: Selection,
) -> Optional[Target]:
    """The given ``Target``, or one built from its keywords (not both); ``None`` without a target."""
    settings = dict(check_every=check_every, layer_floor=layer_floor, prune_by=prune_by)
    changed = [k for k, v in settings.items() if v != Target.__dataclass_fields__[k].default]
    if target is not None:
        if not isinstance(target, Target):
            raise TypeError(f"`target` must be a lightning_spred.Target, got {target!r}.")
        if sparsity is not None or groups is not None or changed:
            raise ValueError("Give the target once: a `Target` or the keywords `target_sparsity=`, ..., not both.")
    elif sparsity is not None or groups is not None:
        target = Target(sparsity, groups, **settings)  # type: ignore[arg-type]
    elif changed:
        raise ValueError(f"{changed} steer a target: give `target_sparsity=` or `target_groups=` too.")
    if target is None:
        return None
    if target.groups is not None and not selection.groups:
        raise ValueError("`target_groups` counts groups: also give `groups=` (for example {'net.0.weight': 'input'}).")
    if target.prune_by is None and target.groups is not None and set(selection.groups.values()) == {"input"}:
        # feature selection: only the input layer is penalised, and the path ranks the features
        target = dataclasses.replace(target, prune_by="path")
    return target
