"""Lightning plumbing of a training run: callbacks that keep it recoverable, its progress and its CSV log.

- RunCheckpoint: `step-<N>.ckpt` every `checkpointing.every_n_train_steps` optimizer steps (the
  newest `checkpointing.keep_last` kept) and `last.ckpt`, a copy of the newest one (a file of its
  own: damage to one never reaches the other). Every write is atomic (checkpoints.AtomicCheckpointIO),
  so a kill at any instant leaves the previous last.ckpt.
- GracefulStop: on SIGTERM/SIGINT, or when `trainer.max_time` (counted from the start of this
  command) would run out during the next optimizer step, stops training at the end of the current
  optimizer step -- never inside a gradient-accumulation window, whose partial gradients no
  checkpoint holds -- so that main.train saves last.ckpt and a re-run resumes exactly.
- ProgressLog: the training and validation progress (step, loss, tokens/s, ETA): a bar on a
  terminal, a line every few seconds in any other log (progress.py).
- run_history_logger: <run dir>/logs/metrics.csv, continued across resumes.

Lightning offers no public hook for three things done here, each guarded by a test that fails
when Lightning changes them (tests/test_callbacks.py): whether a batch ends an accumulation window
(`fit_loop.epoch_loop._should_accumulate`), how ModelCheckpoint makes last.ckpt
(`_link_checkpoint`) and keeps its top-k bookkeeping, and how CSVLogger's writer starts and
rewrites metrics.csv.
"""
import csv
import io
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

import checkpoints
import progress
from atomic import atomic_write, remove_stale_temps

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
        """last.ckpt <- an atomic copy of `filepath` (the kernel copies: nothing is serialised twice)."""
        if trainer.is_global_zero:
            with open(filepath, 'rb') as src:
                checkpoints.make_room(linkpath, os.fstat(src.fileno()).st_size)
                atomic_write(linkpath, lambda dst: shutil.copyfileobj(src, dst, 16 * 2 ** 20))
        trainer.strategy.barrier()


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
        self._install()

    def _install(self):
        for sig in self._original:
            try:
                signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals stay Lightning's
                pass

    def on_fit_end(self, trainer, pl_module):
        # Lightning's teardown has just put back every handler it found before fit (for SIGINT,
        # Python's KeyboardInterrupt); after a first signal, a second one must still stop the
        # process at once while it saves and exits.
        if self.signum is not None:
            self._install()

    def teardown(self, trainer, pl_module, stage):
        if self.signum is not None:  # the run is stopping: a second signal still stops it at once
            return
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


class ProgressLog(Callback):
    """Training progress by optimizer step (loss, tokens/s, ETA) and validation progress by batch:
    a bar on a terminal, else a line every few seconds (progress.Reporter). Replaces Lightning's bar,
    which counts epochs ("Epoch 0/-2" for a run bounded by steps) and prints nothing in a log file."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.train = self.valid = None
        self.micro = 0  # micro-batches of the current accumulation window done

    def on_train_start(self, trainer, pl_module):
        accumulation = trainer.accumulate_grad_batches

        def extra():
            loss = trainer.callback_metrics.get('train/loss')
            within = f'micro-batch {self.micro}/{accumulation} of the next step' if self.micro else ''
            return ', '.join(t for t in (f'loss {float(loss):.4f}' if loss is not None else '', within) if t)
        self.train = progress.Reporter('training', trainer.max_steps, unit='steps', extra=extra,
                                       start=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.train is None:
            return
        if at_step_boundary(trainer):
            self.micro = 0
            self.train.update()
        else:  # a long accumulation window still reports every few seconds
            self.micro += 1
            self.train.poll()

    def on_train_end(self, trainer, pl_module):
        if self.train is not None:
            self.train.close()
            tokens = (trainer.global_step - self.train.first) * self.tokens_per_step
            seconds = time.monotonic() - self.train.started
            if tokens:
                progress.log.info('Trained %d steps in %s (%.0f tokens/s)', trainer.global_step - self.train.first,
                                  progress.duration(seconds), tokens / max(seconds, 1e-9))

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            total = sum(trainer.num_val_batches) if trainer.num_val_batches else None
            self.valid = progress.Reporter('validation', int(total) if total else None, unit='batches')

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.valid is not None:
            self.valid.update()

    def on_validation_end(self, trainer, pl_module):
        if self.valid is not None:
            self.valid.close()
            self.valid = None
            nll = trainer.callback_metrics.get('val/nll')
            if nll is not None:
                when = f' at step {trainer.global_step}' if trainer.state.fn == 'fit' else ''
                progress.log.info('Validation%s: NLL bound %.4f nats/token (PPL <= %.2f)', when, float(nll),
                                  float(trainer.callback_metrics['val/ppl']))


class ValidationSamples(Callback):
    """eval.generate_samples=true: at every validation during training, draw one batch of samples
    (sampling.*, the weights being validated: the EMA's) and log their entropy (val/sample_entropy)
    and the first of them, so that a run shows what the model writes as it trains."""

    def __init__(self, tokenizer, batch_size: int):
        self.tokenizer, self.batch_size = tokenizer, batch_size

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != 'fit' or pl_module.stop_validation:
            return
        import metrics
        import runtime
        block = runtime.sequences_per_block(pl_module.device.type, int(pl_module.config.model.length),
                                            pl_module.vocab_size)
        samples = pl_module.generate(min(self.batch_size, block)).cpu()
        pl_module.log('val/sample_entropy', metrics.sample_entropy(samples))
        text = self.tokenizer.decode(samples[0].tolist())
        progress.log.info('Sample at step %d: %s', trainer.global_step, text[:500] + ('...' if len(text) > 500 else ''))


def run_history_logger(run_dir: Path, resume_step: int):
    """CSV log of the whole run in <run dir>/logs/metrics.csv, continued across resumes.

    Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps the rows of the
    steps its checkpoint had reached and drops the later ones (they are trained again).
    """

    class ContinuedWriter(ExperimentWriter):
        def _check_log_dir_exists(self):
            if not os.path.isfile(self.metrics_file_path):
                return
            rows = [r for r in read_rows(self.metrics_file_path) if r['step'] < resume_step]
            keys = sorted(set().union(*rows)) if rows else []
            self.metrics_keys = keys
            atomic_write(self.metrics_file_path, lambda f: _write_rows(f, keys, rows), mode='w')

        def _rewrite_with_new_header(self, fieldnames):  # Lightning truncates and rewrites in place
            rows = read_rows(self.metrics_file_path)
            atomic_write(self.metrics_file_path, lambda f: _write_rows(f, fieldnames, rows), mode='w')

    class RunLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._experiment = ContinuedWriter(log_dir=self.log_dir)
            return self._experiment

    return RunLogger(run_dir, name='logs', version='')


def read_rows(path) -> list[dict]:
    """The rows of a metrics.csv with an integer step; a last line cut short by a kill (no final
    newline) is dropped."""
    with open(path, newline='') as f:
        text = f.read()
    if not text.endswith('\n'):
        text = text[:text.rfind('\n') + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        row.pop(None, None)  # cells beyond the header
        try:
            row['step'] = int(row.get('step') or '')
        except ValueError:
            continue
        rows.append({k: v for k, v in row.items() if v not in (None, '') or k == 'step'})
    return rows


def _write_rows(f, keys, rows):
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
