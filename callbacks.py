"""Lightning callbacks that keep a training run recoverable.

- RunCheckpoint: `step-<N>.ckpt` every `checkpointing.every_n_train_steps` optimizer steps (the
  newest `checkpointing.keep_last` kept) and `last.ckpt`, a hard link to the newest one (no second
  copy written; a plain copy where the filesystem has no hard links). Every write is atomic
  (checkpoints.AtomicCheckpointIO), so a kill at any instant leaves the previous last.ckpt.
- GracefulStop: on SIGTERM/SIGINT, or when `trainer.max_time` (counted from the start of this
  command) would run out during the next optimizer step, stops training at the end of the current
  optimizer step -- never inside a gradient-accumulation window, whose partial gradients no
  checkpoint holds -- so that main.train saves last.ckpt and a re-run resumes exactly.
"""
import logging
import os
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import checkpoints
from atomic import atomic_write, fsync_directory, remove_stale_temps

log = logging.getLogger(__name__)


def at_step_boundary(trainer) -> bool:
    """True when the batch just trained completed an optimizer step (not mid-accumulation)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


class RunCheckpoint(ModelCheckpoint):
    """Periodic checkpoints plus last.ckpt; the directory holds the truth about which exist."""

    def __init__(self, dirpath, every_n_train_steps: int, keep_last: int):
        super().__init__(dirpath=dirpath, filename='step-{step}', auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_top_k=keep_last, monitor='step',
                         mode='max', save_last='link', enable_version_counter=False)
        self.keep_last = keep_last

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == 'fit' and Path(self.dirpath).is_dir():
            freed = remove_stale_temps(self.dirpath)  # left by killed saves; no save is in flight
            if freed:
                log.info('Removed %.1f MB of partial checkpoint files left by an interrupted save', freed / 1e6)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._sync_with_disk()  # files written or deleted after this checkpoint was saved

    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        if checkpoints.PERIODIC.fullmatch(Path(filepath).name):
            if trainer.is_global_zero:
                for old in checkpoints.periodic_checkpoints(self.dirpath)[:-self.keep_last or None]:
                    old.unlink(missing_ok=True)
            self._sync_with_disk()

    def _sync_with_disk(self):
        """Rebuild the top-k bookkeeping from the periodic files on disk (newest = best): it stays
        right after kills, after make_room deleted files, and when keep_last changes on a resume."""
        if self.dirpath is None or self.keep_last < 1:
            return
        kept = checkpoints.periodic_checkpoints(self.dirpath)[-self.keep_last:]
        self.best_k_models = {str(p): torch.tensor(int(checkpoints.PERIODIC.fullmatch(p.name).group(1)))
                              for p in kept}
        if kept:
            self.best_model_path = str(kept[-1])
            self.best_model_score = self.best_k_models[self.best_model_path]
            self.kth_best_model_path = str(kept[0])
            self.kth_value = self.best_k_models[self.kth_best_model_path]

    @staticmethod
    def _link_checkpoint(trainer, filepath, linkpath):
        """last.ckpt <- a hard link to `filepath`, replaced atomically (a copy where links fail)."""
        if trainer.is_global_zero:
            directory = Path(linkpath).parent
            tmp = directory / f'.{Path(linkpath).name}.{os.getpid()}.link.tmp'
            tmp.unlink(missing_ok=True)
            try:
                os.link(filepath, tmp)
                os.replace(tmp, linkpath)
                fsync_directory(directory)
            except OSError:
                tmp.unlink(missing_ok=True)
                with open(filepath, 'rb') as src:
                    checkpoints.make_room(linkpath, os.fstat(src.fileno()).st_size)
                    atomic_write(linkpath, lambda dst: _copy(src, dst))
        trainer.strategy.barrier()


def _copy(src, dst):
    while chunk := src.read(16 * 2 ** 20):
        dst.write(chunk)


class GracefulStop(Callback):
    """Stop at the end of the current optimizer step on SIGTERM/SIGINT or before `deadline`.

    `deadline`: a time.monotonic() value (or None); training stops at the first optimizer-step
    boundary from which one more step (as long as the last one took) would pass it. A second
    signal stops the process at once (the previous checkpoints stay intact). `reason` says why
    training stopped: None, 'max_time' or the signal's name; `signum` the signal received.
    """

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self.signum = None
        self.reason = None
        self._module = None
        self._last_boundary = None
        self._original = {}

    def setup(self, trainer, pl_module, stage):
        if os.name == 'posix':
            self._original = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    # Lightning installs its own SIGTERM handler just before training (it stops after any batch,
    # also inside an accumulation window); this one replaces it for the training loop.
    def on_train_start(self, trainer, pl_module):
        self._module = pl_module
        self._last_boundary = time.monotonic()
        for sig in self._original:
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals stay Lightning's
                pass

    def teardown(self, trainer, pl_module, stage):
        for sig, handler in self._original.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass

    def _on_signal(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning('Received %s: stopping after this optimizer step and saving last.ckpt '
                    '(send it again to stop at once, without saving)', signal.Signals(signum).name)
        trainer = self._module.trainer
        if trainer.validating and trainer.world_size == 1:
            self._module.stop_validation = True  # the run stops after it: skip the rest

    def _check(self, trainer):
        """Set trainer.should_stop when a signal came or the deadline is near (the same on every rank)."""
        now = time.monotonic()
        step_seconds = now - self._last_boundary
        self._last_boundary = now
        stop = self.signum is not None or (self.deadline is not None and now + step_seconds >= self.deadline)
        if trainer.world_size > 1:  # every rank stops at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.reason = 'max_time' if self.signum is None else signal.Signals(self.signum).name
            trainer.should_stop = True
            # Lightning validates when should_stop is set; the time is short: skip that.
            trainer.fit_loop.epoch_loop._skip_next_val = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if at_step_boundary(trainer):
            self._check(trainer)

    def on_validation_end(self, trainer, pl_module):
        # A signal during validation stops right after it, when it ran at a step boundary; the
        # check runs on every rank (it may synchronise them), never in the sanity check.
        if self._last_boundary is not None and not trainer.sanity_checking and at_step_boundary(trainer):
            self._check(trainer)
