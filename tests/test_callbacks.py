"""callbacks.py: last.ckpt as a file of its own, the CSV log continued across resumes, progress lines,
and the Lightning internals the callbacks rely on (these tests fail loudly when a Lightning release
changes them; requirements.txt caps lightning below the next minor release)."""
import csv
import inspect
import logging
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

import callbacks
import checkpoints
import progress

pytestmark = [pytest.mark.filterwarnings('ignore:.*does not have many workers'),
              pytest.mark.filterwarnings('ignore:.*isinstance\\(treespec, LeafSpec\\)')]


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log('train/loss', loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, max_steps, extra=(), accumulate=1):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=2)
    checkpoint = callbacks.RunCheckpoint(tmp_path / 'checkpoints', every_n_train_steps=2, keep_last=1)
    trainer = L.Trainer(max_steps=max_steps, accelerator='cpu', logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint, *extra], accumulate_grad_batches=accumulate,
                        plugins=[checkpoints.AtomicCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(Tiny(), data)
    return trainer


def test_last_ckpt_is_a_file_of_its_own(tmp_path):
    fit(tmp_path, 4)
    last, periodic = tmp_path / 'checkpoints' / 'last.ckpt', tmp_path / 'checkpoints' / 'step-4.ckpt'
    assert sorted(p.name for p in last.parent.iterdir()) == ['last.ckpt', 'step-4.ckpt']  # keep_last=1
    assert last.read_bytes() == periodic.read_bytes() and not os.path.samefile(last, periodic)
    last.write_bytes(last.read_bytes()[:100])  # damage to one never reaches the other
    assert checkpoints.read_progress(periodic) == (4, 0)


def test_progress_is_reported_inside_long_accumulation_windows(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, 'EVERY_SECONDS', 0.0)
    monkeypatch.setattr(progress, 'interactive', lambda: False)
    with caplog.at_level(logging.INFO, logger='duo'):
        fit(tmp_path, 2, extra=[callbacks.ProgressLog(tokens_per_step=64)], accumulate=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('training:')]
    assert any('micro-batch 2/4 of the next step' in line for line in lines)
    assert any(line.startswith('training: 2/2 steps') for line in lines) and 'Trained 2 steps' in caplog.text


def test_metrics_log_continues_across_resumes(tmp_path):
    """A resumed run keeps the rows its checkpoint had reached and drops the later ones."""
    logs = tmp_path / 'logs'
    logs.mkdir()
    with open(logs / 'metrics.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['step', 'train/loss', 'val/nll'])
        writer.writeheader()
        writer.writerows([{'step': 9, 'train/loss': 3.0}, {'step': 19, 'train/loss': 2.0},
                          {'step': 19, 'val/nll': 2.5}, {'step': 29, 'train/loss': 1.0}])
    logger = callbacks.run_history_logger(tmp_path, resume_step=20)  # the checkpoint is at step 20
    logger.log_metrics({'train/loss': 1.5}, step=29)
    logger.log_metrics({'train/lr': 0.1}, step=39)  # a new column
    logger.save()
    with open(logs / 'metrics.csv', newline='') as f:
        rows = [(r['step'], r['train/loss'], r['val/nll'], r['train/lr']) for r in csv.DictReader(f)]
    assert rows == [('9', '3.0', '', ''), ('19', '2.0', '', ''), ('19', '', '2.5', ''), ('29', '1.5', '', ''),
                    ('39', '', '', '0.1')]


def test_the_lightning_internals_the_callbacks_use_are_still_there(tmp_path):
    """No public hook exists for these; if a Lightning release renames or reshapes one, this fails
    before any run goes wrong."""
    assert callable(_TrainingEpochLoop._should_accumulate)  # callbacks.at_step_boundary
    trainer = fit(tmp_path, 2)
    assert hasattr(trainer.fit_loop.epoch_loop, '_skip_next_val')  # GracefulStop skips the last validation
    assert list(inspect.signature(ModelCheckpoint._link_checkpoint).parameters) == ['trainer', 'filepath', 'linkpath']
    assert list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters) == ['self', 'trainer', 'filepath']
    for name in ('best_k_models', 'best_model_path', 'best_model_score', 'kth_best_model_path', 'kth_value'):
        assert hasattr(trainer.checkpoint_callback, name), name  # RunCheckpoint._sync_with_disk rebuilds them
    for name in ('_check_log_dir_exists', '_rewrite_with_new_header'):
        assert callable(getattr(ExperimentWriter, name)), name  # run_history_logger's writer
    assert 'metrics_file_path' in vars(ExperimentWriter(log_dir=str(tmp_path / 'w')))


def test_after_a_first_signal_the_handler_outlives_lightnings_teardown():
    """Lightning's teardown puts back every signal handler it found before fit (for SIGINT, Python's
    KeyboardInterrupt) before on_fit_end: after a first signal, GracefulStop takes SIGINT/SIGTERM back
    there and keeps them through its own teardown, so a second Ctrl-C while last.ckpt is saved or
    the process exits still stops it at once (not a KeyboardInterrupt reported as 'interrupted')."""
    import signal
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = callbacks.GracefulStop()
        stop.setup(None, None, 'fit')
        stop._install()
        stop.signum = signal.SIGINT                           # the first Ctrl-C came
        for sig in saved:                                     # what Lightning's _SignalConnector.teardown does
            signal.signal(sig, saved[sig])
        stop.on_fit_end(None, None)
        stop.teardown(None, None, 'fit')
        assert all(signal.getsignal(sig) == stop._on_signal for sig in saved)
        quiet = callbacks.GracefulStop()                      # no signal: teardown gives the handlers back
        quiet.setup(None, None, 'fit')
        quiet._install()
        quiet.on_fit_end(None, None)
        quiet.teardown(None, None, 'fit')
        assert all(signal.getsignal(sig) == stop._on_signal for sig in saved)  # what it found at setup
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
