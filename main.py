"""duo entry point: python main.py mode=train|ppl_eval|sample_eval [Hydra overrides].

Examples:
  python main.py mode=train data=openwebtext-split algo=duo_base loader.batch_size=2 model.length=512
  python main.py mode=ppl_eval algo=duo_base eval.checkpoint_path=outputs/.../checkpoints/last.ckpt
  python main.py mode=sample_eval algo=duo eval.checkpoint_path=s-sahoo/duo-distilled sampling.steps=8
"""
import json
import logging
import logging.handlers
import os
import re
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import runtime
from atomic import atomic_write, write_text
from errors import CheckpointError, ConfigError, DataError, RunStopped

log = logging.getLogger('duo')
STARTED = time.monotonic()  # trainer.max_time counts from here

MODES = ('train', 'ppl_eval', 'sample_eval')


# ---- resolving the configuration -----------------------------------------------------------
def setting_int(config, key: str, example) -> int:
    """The integer setting `key` (dotted), or ConfigError naming it."""
    value = OmegaConf.select(config, key)
    try:
        if isinstance(value, bool) or value is None or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value} must be an integer (e.g. {key}={example})") from None


def setting_float(config, key: str, example) -> float:
    value = OmegaConf.select(config, key)
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value} must be a number (e.g. {key}={example})") from None


def max_time_seconds(value) -> int | None:
    """trainer.max_time (DD:HH:MM:SS, as Lightning spells it) in seconds; None when unset."""
    if value is None or str(value).strip() in ('', 'None', 'null'):
        return None
    match = re.fullmatch(r'(\d+):(\d\d):(\d\d):(\d\d)', str(value).strip())
    if not match:
        raise ConfigError(f"trainer.max_time={value} is not DD:HH:MM:SS (e.g. trainer.max_time=00:11:30:00)")
    days, hours, minutes, seconds = map(int, match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def resolve_config(config: DictConfig) -> DictConfig:
    """Fill the derived settings (batch sizes, accumulation, precision) and reject bad values."""
    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode} is unknown: use one of {', '.join(MODES)} (e.g. mode=train)")
    for key, example in (('loader.global_batch_size', 512), ('loader.eval_global_batch_size', 512),
                         ('trainer.num_nodes', 1)):
        if setting_int(config, key, example) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= 1 (e.g. {key}={example})")
    for key in ('loader.batch_size', 'loader.eval_batch_size', 'trainer.accumulate_grad_batches'):
        if OmegaConf.select(config, key) is not None and setting_int(config, key, 8) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= 1 (e.g. {key}=8)")
    t, loader = config.trainer, config.loader
    accelerator = runtime.resolve_accelerator(t.accelerator)
    world = runtime.world_size(t)
    with open_dict(config):
        t.accelerator = accelerator
        t.precision = runtime.resolve_precision(t.precision, accelerator)
        for key, global_key in (('batch_size', 'global_batch_size'), ('eval_batch_size', 'eval_global_batch_size')):
            if loader[key] is None:
                loader[key] = max(int(loader[global_key]) // world, 1)
            if int(loader[key]) < 1:
                raise ConfigError(f"loader.{key}={loader[key]} must be >= 1 (e.g. loader.{key}=8)")
        per_step = int(loader.batch_size) * world
        if t.accumulate_grad_batches is None:
            if int(loader.global_batch_size) % per_step:
                raise ConfigError(
                    f"loader.global_batch_size={loader.global_batch_size} is not divisible by loader.batch_size x "
                    f"devices x nodes = {per_step}: use e.g. loader.global_batch_size={per_step * max(int(loader.global_batch_size) // per_step, 1)}")
            t.accumulate_grad_batches = int(loader.global_batch_size) // per_step
        else:
            loader.global_batch_size = per_step * int(t.accumulate_grad_batches)
    for key, example in (('model.hidden_size', 768), ('model.cond_dim', 128), ('model.n_blocks', 12),
                         ('model.n_heads', 12)):
        if setting_int(config, key, example) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= 1 (e.g. {key}={example})")
    if setting_int(config, 'model.length', 128) < 4:
        raise ConfigError(f"model.length={config.model.length} is too short: use at least 4 (e.g. model.length=128)")
    if not 0 <= setting_float(config, 'model.dropout', 0.1) < 1:
        raise ConfigError(f"model.dropout={config.model.dropout} must be in [0, 1) (e.g. model.dropout=0.1)")
    if setting_int(config, 'sampling.steps', 128) < 1:
        raise ConfigError(f"sampling.steps={config.sampling.steps} must be >= 1 (e.g. sampling.steps=128)")
    if not 0 < setting_float(config, 'sampling.p_nucleus', 0.9) <= 1:
        raise ConfigError(f"sampling.p_nucleus={config.sampling.p_nucleus} must be in (0, 1] (e.g. sampling.p_nucleus=0.9)")
    if config.mode == 'train':
        for key, low, example in (('trainer.max_steps', 1, 100000), ('checkpointing.every_n_train_steps', 1, 5000),
                                  ('checkpointing.keep_last', 0, 3), ('training.max_nonfinite_steps', 1, 25)):
            if setting_int(config, key, example) < low:
                raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= {low} (e.g. {key}={example})")
        if not 0 <= setting_float(config, 'training.ema', 0.9999) < 1:
            raise ConfigError(f"training.ema={config.training.ema} must be in [0, 1) (0 = no EMA; e.g. training.ema=0.9999)")
        max_time_seconds(t.max_time)
    return config


# ---- building blocks -----------------------------------------------------------------------
def build_model(config, tokenizer):
    import dataloader
    from diffusion import Diffusion
    vocab_size, mask_id = dataloader.model_vocab(tokenizer)
    return Diffusion(config, vocab_size, mask_id, tokenizer.bos_token_id)


def load_for_eval(config, tokenizer):
    """The model of eval.checkpoint_path (EMA weights applied unless eval.disable_ema=true).

    A Hugging Face-format checkpoint carries its sizes in config.json: they replace model.*
    (so `algo.backbone=hf_dit eval.checkpoint_path=s-sahoo/duo` needs no model= override).
    """
    import checkpoints
    path = str(config.eval.checkpoint_path)
    state_dict, ema_state, meta = checkpoints.load_weights(path, 'eval.checkpoint_path')
    if 'hf_config' in meta:
        adopt_model_settings(config, meta['hf_config'], path)
    model = build_model(config, tokenizer)
    checkpoints.check_compatible(state_dict, model.backbone, f"checkpoint {path}")
    model.backbone.load_state_dict(state_dict)
    if ema_state is not None and model.ema is not None:
        model.ema.load_state_dict(ema_state)
        if not config.eval.disable_ema:
            model.ema.copy_to(model.backbone.parameters())
    model.ema = None  # the weights to evaluate are now in the backbone
    log.info('Loaded %s (%s weights)', path,
             'EMA' if ema_state is not None and not config.eval.disable_ema else 'raw')
    return model


def adopt_model_settings(config, hf_config: dict, path: str):
    from models.hf_format import model_settings
    settings = model_settings(hf_config)
    if int(config.model.length) > settings['length']:
        raise ConfigError(f"model.length={config.model.length} exceeds the {settings['length']} positions of "
                          f"{path}: use model.length={settings['length']} or less")
    with open_dict(config):
        for key in ('hidden_size', 'cond_dim', 'n_blocks', 'n_heads'):
            config.model[key] = settings[key]
    log.info('Model sizes from %s: hidden_size=%d cond_dim=%d n_blocks=%d n_heads=%d', path,
             *(settings[k] for k in ('hidden_size', 'cond_dim', 'n_blocks', 'n_heads')))


def read_finetune(config):
    """(backbone state_dict, EMA state or None) of training.finetune_path: our .ckpt, or a Hugging
    Face directory / hub id as released (EMA applied), whose config.json also gives the model sizes
    (so no model= override is needed)."""
    import checkpoints
    path = str(config.training.finetune_path)
    if not (Path(path).exists() or checkpoints.is_hf_reference(path)):
        raise ConfigError(f"training.finetune_path={path} does not exist: pass the trained model to start from "
                          f"(e.g. training.finetune_path=outputs/owt/duo-small-L1024/checkpoints/last.ckpt)")
    state_dict, ema_state, meta = checkpoints.load_weights(path, 'training.finetune_path')
    if 'hf_config' in meta:
        adopt_model_settings(config, meta['hf_config'], path)
    return state_dict, ema_state


def load_finetune(model, state_dict, ema_state, path):
    """Start training (not a resume) from trained weights, e.g. to distil a DUO model: the EMA
    weights of the checkpoint when it has them, else its weights. The backbone and its EMA both
    begin there; optimizer, step count and data order start afresh."""
    import checkpoints
    source = f"training.finetune_path={path}"
    checkpoints.check_compatible(state_dict, model.backbone, source)
    if ema_state is not None:
        names = [name for name, _ in model.backbone.named_parameters()]
        if len(names) != len(ema_state['shadow_params']):
            raise CheckpointError(f"{source}: its EMA has {len(ema_state['shadow_params'])} tensors for "
                                              f"{len(names)} parameters: the checkpoint is damaged")
        state_dict = {**state_dict, **dict(zip(names, ema_state['shadow_params']))}
        checkpoints.check_compatible(state_dict, model.backbone, f"{source} (its EMA)")
    model.backbone.load_state_dict(state_dict)
    if model.ema is not None:
        model.ema.shadow_params = [p.detach().clone() for p in model.backbone.parameters()]
    log.info('Initialised the weights from %s (%s weights)', path, 'EMA' if ema_state is not None else 'its')


def run_history_logger(run_dir: Path, resume_step: int):
    """CSV log of the whole run in <run dir>/logs/metrics.csv, continued across resumes.

    Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps the rows of the
    steps its checkpoint had reached and drops the later ones (they are trained again).
    """
    import csv
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter


    class ContinuedWriter(ExperimentWriter):
        def _check_log_dir_exists(self):
            if not os.path.isfile(self.metrics_file_path):
                return
            rows = [r for r in _read_rows(self.metrics_file_path) if r['step'] < resume_step]
            keys = sorted(set().union(*rows)) if rows else []
            self.metrics_keys = keys
            atomic_write(self.metrics_file_path, lambda f: _write_rows(f, keys, rows), mode='w')

        def _rewrite_with_new_header(self, fieldnames):  # Lightning truncates and rewrites in place
            rows = _read_rows(self.metrics_file_path)
            atomic_write(self.metrics_file_path, lambda f: _write_rows(f, fieldnames, rows), mode='w')

    class RunLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._experiment = ContinuedWriter(log_dir=self.log_dir)
            return self._experiment

    return RunLogger(run_dir, name='logs', version='')


def _read_rows(path) -> list[dict]:
    """The rows of a metrics.csv with an integer step; a last line cut short by a kill (no final
    newline) is dropped."""
    import csv
    import io
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
    import csv
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)


def build_trainer(config, run_dir: Path, for_training: bool, resume_step: int = 0, stop=None):
    """The Lightning Trainer; for training with RunCheckpoint and `stop` (a callbacks.GracefulStop,
    which also enforces trainer.max_time: Lightning's own timer would count the time of earlier
    runs restored from the checkpoint and stop inside a gradient-accumulation window)."""
    import lightning as L
    from callbacks import RunCheckpoint
    from checkpoints import AtomicCheckpointIO

    t = config.trainer
    loggers = [run_history_logger(run_dir, resume_step)] if for_training else []
    if for_training and config.wandb.enabled or config.wandb.get('offline', False):
        from lightning.pytorch.loggers import WandbLogger
        loggers.append(WandbLogger(project=config.wandb.project, name=config.wandb.name, save_dir=str(run_dir),
                                   offline=bool(config.wandb.get('offline', False))))
    callbacks = []
    if for_training:
        ckpt_dir = Path(config.checkpointing.save_dir) / 'checkpoints'
        callbacks.append(RunCheckpoint(ckpt_dir, int(config.checkpointing.every_n_train_steps),
                                       int(config.checkpointing.keep_last)))
        if stop is not None:
            callbacks.append(stop)
    strategy = config.strategy.name
    if strategy == 'ddp':
        from lightning.pytorch.strategies import DDPStrategy
        strategy = DDPStrategy(find_unused_parameters=config.strategy.find_unused_parameters,
                               process_group_backend='nccl' if t.accelerator == 'gpu' else 'gloo')
    elif strategy == 'single':
        strategy = 'auto'
    elif strategy != 'fsdp':
        raise ConfigError(f"strategy={strategy} is unknown: use single, ddp or fsdp")
    val_interval = t.val_check_interval
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=strategy, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=config.optim.grad_clip or None, val_check_interval=val_interval,
        check_val_every_n_epoch=None if isinstance(val_interval, int) else t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=t.num_sanity_val_steps if for_training else 0,
        logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=run_dir,
        use_distributed_sampler=False, enable_checkpointing=for_training, enable_model_summary=for_training)


def write_json(path, payload):
    write_text(path, json.dumps(payload, indent=2))


# ---- modes ---------------------------------------------------------------------------------
def train(config, run_dir: Path):
    import checkpoints
    import dataloader
    from callbacks import GracefulStop
    tokenizer = dataloader.get_tokenizer(config)
    last = Path(config.checkpointing.save_dir) / 'checkpoints' / checkpoints.LAST
    ckpt_path = str(last) if config.checkpointing.resume and last.exists() else None
    resume_step = 0
    finetune = None
    if not ckpt_path and config.training.finetune_path:  # read first: a released config sets the model sizes
        finetune = read_finetune(config)
    elif config.algo.name == 'distillation' and not ckpt_path:
        log.warning('algo=distillation without training.finetune_path distils an untrained model; '
                    'pass training.finetune_path=<the trained DUO checkpoint>')
    model = build_model(config, tokenizer)  # before the data: a bad model or checkpoint is reported at once
    if ckpt_path:
        resume_step, micro_step = check_resumable(last, model)
    elif finetune is not None:
        load_finetune(model, *finetune, str(config.training.finetune_path))
    train_loader, valid_loader = dataloader.get_dataloaders(config, tokenizer)
    check_training_blocks(config, train_loader.batch_sampler)
    if ckpt_path:  # continue the data stream after the batches the checkpoint has already trained on
        train_loader.batch_sampler.start = micro_step
    budget = max_time_seconds(config.trainer.max_time)
    stop = GracefulStop(None if budget is None else STARTED + budget)
    trainer = build_trainer(config, run_dir, for_training=True, resume_step=resume_step, stop=stop)
    begin_run(config, run_dir)
    if ckpt_path:
        log.info('Resuming from %s (step %d, after %d batches)', ckpt_path, resume_step, micro_step)
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    try:
        trainer.fit(model, train_loader, valid_loader, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's handler, before the training loop began: nothing new to save
        log.info('Received SIGTERM before training started; %s is unchanged', last)
        sys.exit(128 + signal.SIGTERM)
    # The final state (unless the checkpoint callback has just saved this very step).
    if not last.exists() or checkpoints.read_progress(last)[0] != trainer.global_step:
        trainer.save_checkpoint(last)
    if trainer.global_step < int(config.trainer.max_steps):
        why = 'trainer.max_time is nearly over' if stop.reason == 'max_time' else f'received {stop.reason}'
        log.info('Stopped at step %d (%s); saved %s: run the same command again to resume', trainer.global_step,
                 why, last)
        if stop.signum is not None:
            sys.exit(128 + stop.signum)


def check_training_blocks(config, sampler):
    """The training split must fill one batch per device (the sampler would only find out in fit)."""
    world = runtime.world_size(config.trainer)
    if sampler.n // world < sampler.batch_size:
        raise DataError(
            f'the training split of data={config.data.name} has {sampler.n} blocks of model.length='
            f'{config.model.length}, fewer than loader.batch_size={sampler.batch_size} x {world} devices: add '
            f'documents or lower loader.batch_size (e.g. loader.batch_size={max(sampler.n // world, 1)})')


def check_resumable(last: Path, model) -> tuple[int, int]:
    """(step, batches consumed) of the run's last.ckpt, after checking that it is readable and of this model."""
    import checkpoints
    try:
        checkpoint = checkpoints.read_checkpoint(last, mmap=True)
    except CheckpointError as e:
        periodic = checkpoints.periodic_checkpoints(last.parent)
        fix = f'copy the newest periodic checkpoint over it (cp {periodic[-1]} {last})' if periodic else \
            f'delete it to start again'
        reason = str(e).split(' (', 1)[-1].split(');', 1)[0]
        raise CheckpointError(f'{last} cannot be read ({reason}): {fix}, or start a new run elsewhere '
                                          f'(hydra.run.dir=...)') from None
    state_dict = {k[len(checkpoints.PREFIX):]: v for k, v in checkpoint['state_dict'].items()
                  if k.startswith(checkpoints.PREFIX)}
    checkpoints.check_compatible(state_dict, model.backbone, f'the run to resume ({last})')
    return int(checkpoint.get('global_step', 0)), int(checkpoint.get('micro_step', 0))


def ppl_eval(config, run_dir: Path):
    import dataloader
    tokenizer = dataloader.get_tokenizer(config)
    model = load_for_eval(config, tokenizer)
    _, valid_loader = dataloader.get_dataloaders(config, tokenizer)
    trainer = build_trainer(config, run_dir, for_training=False)
    begin_run(config, run_dir)
    metrics = trainer.validate(model, valid_loader, verbose=False)[0]
    result = {'nll': metrics['val/nll'], 'ppl': metrics['val/ppl'], 'bpd': metrics['val/bpd'],
              'tokens': int(metrics['val/tokens']), 'checkpoint': str(config.eval.checkpoint_path),
              'algo': config.algo.name, 'data': config.data.name}
    print(json.dumps(result, indent=2))
    write_json(config.eval.results_path, result)
    log.info('Wrote %s', config.eval.results_path)
    return result


def sample_eval(config, run_dir: Path):
    import dataloader
    import metrics
    tokenizer = dataloader.get_tokenizer(config)
    model = load_for_eval(config, tokenizer)
    device = torch.device('cuda' if config.trainer.accelerator == 'gpu' else 'cpu')
    begin_run(config, run_dir)
    model.to(device).eval()
    torch.manual_seed(config.seed)
    batches = []
    for i in range(int(config.sampling.num_sample_batches)):
        batches.append(model.generate(int(config.loader.eval_batch_size), progress=True).cpu())
        log.info('Sampled batch %d/%d', i + 1, config.sampling.num_sample_batches)
    samples = torch.cat(batches)
    texts = tokenizer.batch_decode(samples.tolist(), skip_special_tokens=False)
    result = {'generative_ppl': None, 'entropy': metrics.sample_entropy(samples),
              'algo': config.algo.name, 'steps': int(config.sampling.steps),
              'checkpoint': str(config.eval.checkpoint_path)}
    if config.eval.compute_generative_perplexity:
        judge = metrics.GenerativePerplexity(config.eval.gen_ppl_eval_model_name_or_path, device=device,
                                             batch_size=int(config.eval.perplexity_batch_size), tokenizer=tokenizer)
        result['generative_ppl'] = judge.compute(texts, eos_token=tokenizer.eos_token, token_ids=samples.tolist())
    result['generated_seqs'] = texts
    for text in texts[:3]:
        print('-' * 80 + '\n' + text)
    print('-' * 80)
    print(json.dumps({k: v for k, v in result.items() if k != 'generated_seqs'}, indent=2))
    write_json(config.eval.generated_samples_path, result)
    log.info('Wrote %d samples to %s', len(texts), config.eval.generated_samples_path)
    return result


def quiet_libraries():
    """One log format (Hydra's, also written to <run dir>/main.log) and no third-party chatter."""
    import warnings
    import lightning  # noqa: F401  (installs its own console handler on import; drop it)
    logging.getLogger('lightning').handlers.clear()
    logging.getLogger('lightning.pytorch.utilities.rank_zero').addFilter(
        lambda record: 'litlogger' not in record.getMessage())
    warnings.filterwarnings('ignore', message='.*isinstance\\(treespec, LeafSpec\\)')


class RunLog:
    """Keeps this command's lines of <run dir>/main.log (Hydra's log file) in memory until its inputs
    are validated (begin_run), so that a command that fails on bad input modifies no file of an
    existing run; the empty main.log and the run directory that Hydra created for it are removed."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = (run_dir / 'main.log').resolve()
        root = logging.getLogger()
        self.handlers = [h for h in root.handlers if isinstance(h, logging.FileHandler)
                         and Path(h.baseFilename).resolve() == self.path]
        entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
        # Hydra has just opened main.log: an empty one is (almost surely) its creation, a directory
        # holding only that file a new run directory.
        self.new_log = self.path.is_file() and self.path.stat().st_size == 0
        self.new_dir = self.new_log and [e.name for e in entries] == ['main.log']
        self.buffer = logging.handlers.MemoryHandler(capacity=2 ** 31, flushLevel=logging.CRITICAL + 1,
                                                     flushOnClose=False)
        for handler in self.handlers:
            root.removeHandler(handler)
        root.addHandler(self.buffer)
        self.begun = False

    def begin(self):
        """Write the held lines and log from now on to main.log."""
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        for record in self.buffer.buffer:
            for handler in self.handlers:
                handler.handle(record)
        self.buffer.buffer.clear()
        for handler in self.handlers:
            root.addHandler(handler)
        self.begun = True

    def discard(self):
        """The command failed before begin(): drop the held lines, and the run directory if it is new."""
        if self.begun:
            return
        logging.getLogger().removeHandler(self.buffer)
        for handler in self.handlers:
            handler.close()
        if self.new_log and self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink()
            if self.new_dir:
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass


_RUN_LOG: RunLog | None = None


def begin_run(config, run_dir: Path):
    """The inputs are valid: from here on the command writes to its run directory."""
    if _RUN_LOG is not None:
        _RUN_LOG.begin()
    log.info('Run directory: %s', run_dir)
    write_text(run_dir / f'config_{config.mode}.yaml', OmegaConf.to_yaml(config))


def fail(message: str, code: int):
    """One line on stderr and the exit code (the traceback only with HYDRA_FULL_ERROR=1)."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent / 'configs'), config_name='config')
def main(config: DictConfig):
    global _RUN_LOG
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_libraries()
    _RUN_LOG = RunLog(run_dir)
    full_error = os.environ.get('HYDRA_FULL_ERROR') == '1'
    try:
        config = resolve_config(config)
        import lightning as L
        L.seed_everything(config.seed, verbose=False)
        return {'train': train, 'ppl_eval': ppl_eval, 'sample_eval': sample_eval}[config.mode](config, run_dir)
    except ValueError as e:  # ConfigError, CheckpointError and the data/model checks
        _RUN_LOG.discard()
        if full_error:
            raise
        fail(str(e), 2)
    except RunStopped as e:  # no disk space, non-finite values: the run cannot go on
        _RUN_LOG.discard()
        log.error('%s', e)
        if full_error:
            raise
        fail(str(e), 1)
    except KeyboardInterrupt:
        _RUN_LOG.discard()
        fail('interrupted', 128 + signal.SIGINT)


# ---- one-line messages for Hydra's own errors ----------------------------------------------
GROUPS = ('algo', 'data', 'model', 'noise', 'lr_scheduler', 'strategy')


def hydra_error_line(error: Exception) -> str:
    """Hydra/OmegaConf's multi-line message for a bad command line as one line with an example."""
    from hydra.errors import MissingConfigException
    config_dir = Path(__file__).resolve().parent / 'configs'
    if isinstance(error, MissingConfigException):
        text = str(error)
        group = next((g for g in GROUPS if f"'{g}/" in text), None)
        if group is not None:
            name = text.split(f"'{group}/", 1)[1].split("'", 1)[0]
            options = sorted(p.stem for p in (config_dir / group).glob('*.yaml'))
            default = OmegaConf.load(config_dir / 'config.yaml').defaults
            example = next((d[group] for d in default if OmegaConf.is_dict(d) and group in d), options[0])
            return f"{group}={name} is unknown: use one of {', '.join(options)} (e.g. {group}={example})"
    text = str(error)
    match = re.search(r"Could not override '([^']+)'", text)
    if match and 'is not in struct' in f'{text} {error.__cause__}':
        key = match.group(1)
        return (f"{key} is not a setting (misspelt?): see configs/config.yaml for the settings "
                f"(e.g. model.length=128); to add a new key write +{key}=...")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = error.__cause__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0].strip() not in lines:
        lines.append(str(cause).splitlines()[0].strip())
    return ' '.join(lines)


def report_hydra_errors(original):
    """Wrap Hydra's run_and_report, which prints a bad command line's error over several lines,
    to print one instead; other errors (bugs) keep Hydra's report with a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def run_and_report(func):
        def checked():
            try:
                return func()
            except (HydraException, OmegaConfBaseException) as e:
                if os.environ.get('HYDRA_FULL_ERROR') == '1':
                    raise
                fail(hydra_error_line(e), 2)
        return original(checked)
    run_and_report.one_line = True
    return run_and_report


def cli():
    """`python main.py ...`: main() with one-line messages for bad command lines."""
    import hydra._internal.utils as hydra_utils
    if not getattr(hydra_utils.run_and_report, 'one_line', False):
        hydra_utils.run_and_report = report_hydra_errors(hydra_utils.run_and_report)
    main()


if __name__ == '__main__':
    cli()
