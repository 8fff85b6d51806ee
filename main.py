"""duo entry point: python main.py mode=train|ppl_eval|sample_eval [Hydra overrides].

Examples:
  python main.py mode=train data=openwebtext-split algo=duo_base loader.batch_size=2 model.length=512
  python main.py mode=ppl_eval algo=duo_base eval.checkpoint_path=outputs/.../checkpoints/last.ckpt
  python main.py mode=sample_eval algo=duo eval.checkpoint_path=s-sahoo/duo-distilled sampling.steps=8
"""
import json
import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger('duo')

MODES = ('train', 'ppl_eval', 'sample_eval')
PRECISIONS = {'16': '16-mixed', '16-mixed': '16-mixed', 'fp16': '16-mixed', 'bf16': 'bf16-mixed',
              'bf16-mixed': 'bf16-mixed', '32': '32-true', '32-true': '32-true', 'fp32': '32-true'}


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and a valid example."""


# ---- resolving the configuration -----------------------------------------------------------
def device_count(trainer_config) -> int:
    devices = trainer_config.devices
    accelerator = resolve_accelerator(trainer_config)
    if devices in ('auto', -1, '-1'):
        return torch.cuda.device_count() if accelerator == 'gpu' else 1
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and ',' in devices:
        return len([d for d in devices.split(',') if d.strip()])
    return int(devices)


def resolve_accelerator(trainer_config) -> str:
    acc = str(trainer_config.accelerator)
    if acc == 'auto':
        return 'gpu' if torch.cuda.is_available() else 'cpu'
    if acc in ('gpu', 'cuda') and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={acc} but no CUDA GPU is visible: use trainer.accelerator=cpu")
    return 'gpu' if acc == 'cuda' else acc


def resolve_precision(precision, accelerator: str) -> str:
    """Map upstream spellings (16, bf16, 32) and 'auto' to Lightning's, checked against the device."""
    precision = str(precision)
    if precision == 'auto':
        if accelerator != 'gpu':
            return '32-true'
        return 'bf16-mixed' if torch.cuda.get_device_capability()[0] >= 8 else '16-mixed'
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported: use one of 16, bf16, 32 or auto")
    resolved = PRECISIONS[precision]
    if accelerator != 'gpu' and resolved == '16-mixed':
        log.warning('trainer.precision=%s (fp16 mixed precision) needs a GPU; using 32 on the CPU', precision)
        return '32-true'
    if accelerator == 'gpu' and resolved == 'bf16-mixed' and torch.cuda.get_device_capability()[0] < 8:
        name = torch.cuda.get_device_name()
        raise ConfigError(f"trainer.precision={precision} needs an Ampere or newer GPU (this {name} has compute "
                          f"capability {'.'.join(map(str, torch.cuda.get_device_capability()))}): use trainer.precision=16")
    return resolved


def resolve_config(config: DictConfig) -> DictConfig:
    """Fill the derived settings (batch sizes, accumulation, precision) and reject bad values."""
    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode} is unknown: use one of {', '.join(MODES)} (e.g. mode=train)")
    t, loader = config.trainer, config.loader
    accelerator = resolve_accelerator(t)
    world = device_count(t) * int(t.num_nodes)
    with open_dict(config):
        t.accelerator = accelerator
        t.precision = resolve_precision(t.precision, accelerator)
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
    if int(config.model.length) < 4:
        raise ConfigError(f"model.length={config.model.length} is too short: use at least 4 (e.g. model.length=128)")
    if int(config.sampling.steps) < 1:
        raise ConfigError(f"sampling.steps={config.sampling.steps} must be >= 1 (e.g. sampling.steps=128)")
    if not 0 < float(config.sampling.p_nucleus) <= 1:
        raise ConfigError(f"sampling.p_nucleus={config.sampling.p_nucleus} must be in (0, 1] (e.g. sampling.p_nucleus=0.9)")
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
    state_dict, ema_state, meta = checkpoints.load_weights(path)
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
    state_dict, ema_state, meta = checkpoints.load_weights(path)
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
            raise checkpoints.CheckpointError(f"{source}: its EMA has {len(ema_state['shadow_params'])} tensors for "
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
            with open(self.metrics_file_path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if int(r.get('step') or 0) < resume_step]
                keys = sorted(set().union(*rows)) if rows else []
            self.metrics_keys = keys
            from checkpoints import atomic_write
            atomic_write(self.metrics_file_path, lambda f: _write_rows(f, keys, rows), mode='w')

    class RunLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._experiment = ContinuedWriter(log_dir=self.log_dir)
            return self._experiment

    return RunLogger(run_dir, name='logs', version='')


def _write_rows(f, keys, rows):
    import csv
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)


def build_trainer(config, run_dir: Path, for_training: bool, resume_step: int = 0):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
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
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename='step-{step}', auto_insert_metric_name=False,
                                         every_n_train_steps=int(config.checkpointing.every_n_train_steps),
                                         save_top_k=int(config.checkpointing.keep_last), monitor='step',
                                         mode='max', save_last=True,
                                         # last.ckpt is always overwritten: a resume (or main.py's own
                                         # save when stopped early) must never leave it stale beside last-v1.ckpt
                                         enable_version_counter=False))
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
        strategy=strategy, max_steps=t.max_steps, max_time=t.max_time, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=config.optim.grad_clip or None, val_check_interval=val_interval,
        check_val_every_n_epoch=None if isinstance(val_interval, int) else t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=t.num_sanity_val_steps if for_training else 0,
        logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=run_dir,
        use_distributed_sampler=False, enable_checkpointing=for_training, enable_model_summary=for_training)


def write_text(path, text: str):
    from checkpoints import atomic_write
    atomic_write(path, lambda f: f.write(text), mode='w')


def write_json(path, payload):
    write_text(path, json.dumps(payload, indent=2))


# ---- modes ---------------------------------------------------------------------------------
def train(config, run_dir: Path):
    import dataloader
    tokenizer = dataloader.get_tokenizer(config)
    last = Path(config.checkpointing.save_dir) / 'checkpoints' / 'last.ckpt'
    ckpt_path = str(last) if config.checkpointing.resume and last.exists() else None
    resume_step = 0
    finetune = None
    if not ckpt_path and config.training.finetune_path:  # read first: a released config sets the model sizes
        finetune = read_finetune(config)
    elif config.algo.name == 'distillation' and not ckpt_path:
        log.warning('algo=distillation without training.finetune_path distils an untrained model; '
                    'pass training.finetune_path=<the trained DUO checkpoint>')
    train_loader, valid_loader = dataloader.get_dataloaders(config, tokenizer)
    model = build_model(config, tokenizer)
    if ckpt_path:
        import checkpoints
        resume_step, micro_step = checkpoints.read_progress(ckpt_path)
        # Continue the data stream after the batches the checkpoint has already trained on.
        train_loader.batch_sampler.start = micro_step
        log.info('Resuming from %s (step %d, after %d batches)', ckpt_path, resume_step, micro_step)
    elif finetune is not None:
        load_finetune(model, *finetune, str(config.training.finetune_path))
    trainer = build_trainer(config, run_dir, for_training=True, resume_step=resume_step)
    trainer.fit(model, train_loader, valid_loader, ckpt_path=ckpt_path)
    trainer.save_checkpoint(last)  # the final state: ModelCheckpoint saves only every_n_train_steps
    if trainer.global_step < int(config.trainer.max_steps):  # stopped early (trainer.max_time)
        log.info('Stopped at step %d; saved %s (run the same command again to resume)', trainer.global_step, last)


def ppl_eval(config, run_dir: Path):
    import dataloader
    tokenizer = dataloader.get_tokenizer(config)
    model = load_for_eval(config, tokenizer)
    _, valid_loader = dataloader.get_dataloaders(config, tokenizer)
    trainer = build_trainer(config, run_dir, for_training=False)
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


@hydra.main(version_base=None, config_path='configs', config_name='config')
def main(config: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_libraries()
    try:
        config = resolve_config(config)
        import lightning as L
        L.seed_everything(config.seed, verbose=False)
        log.info('Run directory: %s', run_dir)
        write_text(run_dir / f'config_{config.mode}.yaml', OmegaConf.to_yaml(config))
        return {'train': train, 'ppl_eval': ppl_eval, 'sample_eval': sample_eval}[config.mode](config, run_dir)
    except ValueError as e:  # ConfigError, CheckpointError and the data/model checks
        if os.environ.get('HYDRA_FULL_ERROR') == '1':
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
