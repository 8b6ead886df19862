"""A Lightning ``Trainer`` configured from the recipe: strategy, precision, checkpoints, loggers (CSV,
TensorBoard, offline W&B), the callbacks a recipe may switch on (learning-rate monitor, early stopping), and
``torch.compile`` of the model (:func:`compiled`)."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    RichProgressBar,
)
from lightning.pytorch.callbacks.model_summary import log as summary_log
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from omegaconf import DictConfig

from segrouter.errors import SegrouterError
from segrouter.interrupts import Deferred, Interrupted
from segrouter.recipe import save_recipe

DEEPSPEED_STAGES = {"deepspeed_stage_2": 2, "deepspeed_stage_3": 3}
PARTIAL = ".tmp"  # suffix of a checkpoint being written (save_atomically)


def check_weights_finite(trainer: L.Trainer) -> None:
    """Stop the run, before a checkpoint is written, when an update has made a weight NaN or infinite.

    A blown-up update is seen by the loss check only at the next step's forward; a checkpoint written in
    between would hold the poisoned weights as the run's "last good" state, and a resume would fail at once."""
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters())
    if not trainer.strategy.reduce_boolean_decision(finite, all=True):
        raise SegrouterError(
            f"non-finite weights after global step {trainer.global_step}",
            fix="lower optim.lr or enable trainer.gradient_clip_val; the last good checkpoint is kept",
        )


def save_atomically(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """Write to a temporary file beside the checkpoint and rename it into place, so a run killed mid-save never
    leaves a truncated checkpoint behind, and what it leaves is in the run's checkpoint folder (removed when a
    run writes there again: :class:`AtomicModelCheckpoint`), never in ``$TMPDIR``. DeepSpeed's sharded
    checkpoint directories are written as they are. Non-finite weights are never written
    (:func:`check_weights_finite`)."""
    check_weights_finite(trainer)
    if isinstance(trainer.strategy, L.pytorch.strategies.DeepSpeedStrategy):
        trainer.save_checkpoint(filepath, weights_only)
        return
    tmp = f"{filepath}{PARTIAL}"
    trainer.save_checkpoint(tmp, weights_only)
    if trainer.is_global_zero:
        os.replace(tmp, filepath)
    trainer.strategy.barrier("atomic_checkpoint")


class DirectCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint straight to the path it is given (:func:`save_atomically` gives a temporary
    name beside the final one). Lightning's own atomic write goes through an fsspec transaction whose
    temporary file lies in ``$TMPDIR``: a run killed during the write left it there, as large as the
    checkpoint, forever. Remote paths keep Lightning's write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose every save goes through :func:`save_atomically`; a training run removes the
    partial files that a killed save left in its checkpoint folder."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for partial in Path(self.dirpath).glob(f"*.ckpt{PARTIAL}"):
                partial.unlink()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        for logger in trainer.loggers:
            logger.after_save_checkpoint(self)


class StepCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` every ``every_n`` optimiser steps and at the final step, atomically: the resume
    points of a run killed mid-epoch (``ModelCheckpoint`` writes ``last.ckpt`` only beside a top-k save).

    At a step that validates, it writes after that validation (after ``ModelCheckpoint``, which runs first:
    both are ``Checkpoint`` callbacks, which Lightning calls last, in order). Written before, the checkpoint
    missed the validation's result, and a resume from it skipped that validation for good: a run killed during
    it could keep a worse best checkpoint than the run not killed."""

    def __init__(self, dirpath: Path, every_n: int) -> None:
        self.path = dirpath / "last.ckpt"
        self.every_n = every_n
        self._saved_step = -1
        self._after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # unchanged across the batches of one accumulation window
        if step != self._saved_step and (step % self.every_n == 0 or step == trainer.max_steps):
            self._saved_step = step
            if validates_after_this_batch(trainer):
                self._after_validation = True
            else:
                self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._after_validation = False
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(trainer, str(self.path))


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates once the current training batch is done: the decision its epoch loop
    takes right after ``on_train_batch_end`` (Lightning has no public hook between the two)."""
    loop = trainer.fit_loop.epoch_loop
    return loop._should_check_val_fx(trainer.fit_loop._data_fetcher) and not loop._skip_next_val


class StopOnSignal(Checkpoint):
    """SIGTERM/SIGINT during training: save ``last.ckpt`` at the next step boundary, then stop with
    :class:`~segrouter.interrupts.Interrupted` (one line, exit code 143/130; see :mod:`segrouter.interrupts`).

    From ``on_train_start`` on (after Lightning has put in its own SIGTERM handler, which would end the run with
    exit code 0) the signals are only noted. The run stops after the batch that completes an optimiser step;
    a signal during validation lets the validation finish, so its score and best checkpoint are kept (a
    ``Checkpoint``, this callback runs after ``ModelCheckpoint``). Lightning puts the command's handlers back
    at teardown."""

    def __init__(self, dirpath: Path) -> None:
        self.path = dirpath / "last.ckpt"
        self.notes = Deferred()
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self.notes.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self._step:  # this batch completed an optimiser step
            self._step = trainer.global_step
            self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        signum = self.notes.signum
        if trainer.world_size > 1:  # every rank stops at the same batch: the save is a collective
            if not trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
                return
            signum = signum or signal.SIGTERM
        if signum is None:
            return
        if trainer.global_step == 0:
            raise Interrupted(signum, "no training step had completed, nothing saved")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(trainer, str(self.path))
        raise Interrupted(signum, f"stopped after global step {trainer.global_step}; saved {self.path} "
                                  "(continue with: segrouter fit --resume)")


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that appends to the run's ``metrics.csv`` on ``--resume`` (Lightning's deletes it)."""

    @property
    @rank_zero_experiment  # other DDP ranks get a no-op writer, as with Lightning's CSVLogger
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):  # keep the rows, and their columns, of the earlier attempt
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class SaveRecipe(Callback):
    """Saves the resolved recipe beside the run's logs (rank 0 only), so every run is reproducible."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and log_dir:
            save_recipe(self.cfg, Path(log_dir) / "recipe.yaml")


class ParameterSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and total, which count nothing here (they need an
    ``example_input_array``, and a batch of this model is a dict built by the data module) and printed
    "Total FLOPs: 0" in a framework whose purpose is counting FLOPs. The LLM FLOPs per sample are counted
    on real validation batches and logged as ``val/llm_flops`` (``segrouter bench`` for a side-by-side count)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        table = table.rsplit("\n", 1)[0]  # the "Total Flops" line
        summary_log.info("\n" + table + "\nLLM FLOPs per sample: counted on validation batches, "
                         "logged as val/llm_flops")


class HeldBanner(Callback):
    """Lightning logs the accelerators it found (and a tip) while the ``Trainer`` is built; this callback holds
    those lines and logs them when the run starts (``setup``), so that an error before the run is its one line,
    not the banner and then the line."""

    def __init__(self) -> None:
        self._log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self._held: list[logging.LogRecord] = []

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self._log.addFilter(self._hold)
        try:
            yield
        finally:
            self._log.removeFilter(self._hold)

    def _hold(self, record: logging.LogRecord) -> bool:
        self._held.append(record)
        return False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        held, self._held = self._held, []
        for record in held:
            self._log.handle(record)


def build_strategy(cfg: DictConfig) -> Any:
    t = cfg.trainer
    if t.strategy in DEEPSPEED_STAGES:
        from segrouter.training.deepspeed_cpu import make_deepspeed_strategy

        return make_deepspeed_strategy(
            DEEPSPEED_STAGES[t.strategy],
            accelerator=t.accelerator,
            offload_optimizer=t.deepspeed.offload_optimizer,
            offload_parameters=t.deepspeed.offload_parameters,
        )
    return t.strategy  # a name Lightning knows: checked with the recipe (segrouter.recipe.validate_ranges)


def build_loggers(cfg: DictConfig, version: int | str | None) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(ResumableCSVLogger(save_dir=cfg.output_dir, name=cfg.name, version=version))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=cfg.output_dir, name=cfg.name, version=version))
    if cfg.logger.wandb.enabled:  # the package is checked with the recipe (segrouter.recipe)
        from lightning.pytorch.loggers import WandbLogger

        w = cfg.logger.wandb
        folder = f"version_{version}" if isinstance(version, int) else str(version)
        run_dir = Path(cfg.output_dir) / cfg.name / folder
        run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes under it: <run folder>/wandb/
        loggers.append(WandbLogger(project=w.project, name=f"{cfg.name}/{run_dir.name}", save_dir=str(run_dir),
                                   offline=w.offline))
    return loggers


def compiled(model: L.LightningModule, cfg: DictConfig) -> L.LightningModule:
    """``model`` under ``torch.compile`` when ``trainer.compile.enabled`` (Lightning takes the compiled module:
    it trains and checkpoints the original's weights, with the compiled forward)."""
    c = cfg.trainer.compile
    if not c.enabled:
        return model
    return torch.compile(model, backend=c.backend, mode=c.mode)  # type: ignore[return-value]


def build_trainer(cfg: DictConfig, version: int | str | None = None,
                  extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    t = cfg.trainer
    loggers = build_loggers(cfg, version)
    files = [lg for lg in loggers if isinstance(lg, (CSVLogger, TensorBoardLogger))]
    run_dir = Path(files[0].log_dir) if files else Path(cfg.output_dir) / cfg.name
    c = cfg.checkpoint
    callbacks: list[Callback] = [
        AtomicModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            monitor=c.monitor,
            mode=c.mode,
            save_last=c.save_last,
            save_top_k=c.save_top_k if c.monitor else 1,
            filename="best-{step}",
            auto_insert_metric_name=False,
        ),
        SaveRecipe(cfg),
        StopOnSignal(run_dir / "checkpoints"),
        *(extra_callbacks or []),
    ]
    if c.every_n_train_steps:
        callbacks.insert(1, StepCheckpoint(run_dir / "checkpoints", int(c.every_n_train_steps)))
    # SegDataModule saves its place in the shuffled stream, so a mid-epoch resume is exact (see EpochSampler)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    if t.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    if t.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.early_stopping.enabled:
        e = t.early_stopping
        callbacks.append(EarlyStopping(monitor=e.monitor, mode=e.mode, patience=e.patience, min_delta=e.min_delta))
    callbacks.append(ParameterSummary())
    kwargs: dict[str, Any] = {
        k: t[k]
        for k in (
            "accelerator", "devices", "num_nodes", "precision", "max_steps", "max_epochs", "accumulate_grad_batches",
            "gradient_clip_val", "val_check_interval", "check_val_every_n_epoch", "log_every_n_steps",
            "limit_train_batches", "limit_val_batches", "limit_test_batches", "num_sanity_val_steps",
            "deterministic", "enable_progress_bar",
        )
        if t[k] is not None
    }
    kwargs["check_val_every_n_epoch"] = t.check_val_every_n_epoch  # None is meaningful: validate by global step
    if t.strategy in DEEPSPEED_STAGES:
        kwargs.pop("gradient_clip_val", None)  # DeepSpeed clips through its own config
    else:
        kwargs["plugins"] = [DirectCheckpointIO()]
    banner = HeldBanner()
    with banner.holding():
        return L.Trainer(
            strategy=build_strategy(cfg),
            logger=loggers or False,
            callbacks=[*callbacks, banner],
            enable_model_summary=False,  # Lightning's default summary; ParameterSummary is in the callbacks
            default_root_dir=str(run_dir),
            **kwargs,
        )
