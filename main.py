"""duo entry point: python main.py mode=train|ppl_eval|sample_eval [Hydra overrides].

Examples:
  python main.py mode=train data=openwebtext-split algo=duo_base loader.batch_size=2 model.length=512
  python main.py mode=ppl_eval eval.checkpoint_path=outputs/.../checkpoints/last.ckpt
  python main.py mode=sample_eval eval.checkpoint_path=s-sahoo/duo-distilled sampling.steps=8

A checkpoint carries its own algorithm and model sizes (checkpoints.configure_from): evaluating or
sampling one needs no algo= or model= override. cli.py turns errors into one line and exit codes.
"""
import json
import logging
import signal
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

import callbacks
import checkpoints
import cli
import conditioning
import dataloader
import duo
import metrics
import runtime
import settings
from atomic import write_text
from diffusion import Diffusion
from errors import ConfigError, DataError

log = logging.getLogger('duo')
STARTED = time.monotonic()  # trainer.max_time counts from here


def build_model(config, tokenizer) -> Diffusion:
    return Diffusion(config, *dataloader.model_vocab(tokenizer), tokenizer.bos_token_id)


def load_for_eval(config):
    """(tokenizer, model) of eval.checkpoint_path, configured from the checkpoint itself."""
    return checkpoints.load_for_eval(config, settings.explicit_keys(cli.explicit_overrides()))


def read_finetune(config) -> checkpoints.Source:
    """The checkpoint of training.finetune_path, whose sizes the model then takes (no model= needed)."""
    path = str(config.training.finetune_path)
    if not (Path(path).exists() or checkpoints.is_hf_reference(path)):
        raise ConfigError(f"training.finetune_path={path} does not exist: pass the trained model to start from "
                          f"(e.g. training.finetune_path=outputs/owt/duo-small-L1024/checkpoints/last.ckpt)")
    source = checkpoints.read_source(path, 'training.finetune_path')
    checkpoints.configure_from(config, source, settings.explicit_keys(cli.explicit_overrides()),
                               'training.finetune_path', evaluating=False)
    return source


def build_trainer(config, run_dir: Path, for_training: bool, resume_step: int = 0, stop=None,
                  tokenizer=None) -> L.Trainer:
    """The Lightning Trainer; for training with RunCheckpoint, progress lines and `stop` (a
    callbacks.GracefulStop, which also enforces trainer.max_time: Lightning's own timer would count
    the time of earlier runs restored from the checkpoint and stop inside an accumulation window)."""
    t = config.trainer
    loggers = [callbacks.run_history_logger(run_dir, resume_step)] if for_training else []
    if for_training and config.wandb.enabled or config.wandb.get('offline', False):
        from lightning.pytorch.loggers import WandbLogger
        wandb = WandbLogger(project=config.wandb.project, name=config.wandb.name, save_dir=str(run_dir),
                            offline=bool(config.wandb.get('offline', False)))
        # Lightning always passes wandb's deprecated `anonymous` setting, which wandb warns about
        # (no public way to leave it out; tests/test_main.py checks this private dict).
        wandb._wandb_init.pop('anonymous', None)
        loggers.append(wandb)
    tokens_per_step = int(config.loader.global_batch_size) * int(config.model.length)
    monitors = [callbacks.ProgressLog(tokens_per_step)]
    if for_training:
        monitors.append(callbacks.RunCheckpoint(Path(config.checkpointing.save_dir) / 'checkpoints',
                                                int(config.checkpointing.every_n_train_steps),
                                                int(config.checkpointing.keep_last)))
        if stop is not None:
            monitors.append(stop)
        if config.eval.generate_samples:
            monitors.append(callbacks.ValidationSamples(tokenizer, int(config.loader.eval_batch_size)))
    strategy = {'single': 'auto', 'fsdp': 'fsdp'}.get(config.strategy.name)
    if config.strategy.name == 'ddp':
        from lightning.pytorch.strategies import DDPStrategy
        strategy = DDPStrategy(find_unused_parameters=config.strategy.find_unused_parameters,
                               process_group_backend='nccl' if t.accelerator == 'gpu' else 'gloo')
    val_interval = t.val_check_interval
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=strategy, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=config.optim.grad_clip or None, val_check_interval=val_interval,
        check_val_every_n_epoch=None if isinstance(val_interval, int) else t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=t.num_sanity_val_steps if for_training else 0,
        logger=loggers or False, callbacks=monitors, plugins=[checkpoints.AtomicCheckpointIO()],
        default_root_dir=run_dir, use_distributed_sampler=False, enable_checkpointing=for_training,
        enable_progress_bar=False, enable_model_summary=False)


def write_json(path, payload):
    write_text(path, json.dumps(payload, indent=2))


# ---- modes ---------------------------------------------------------------------------------
def train(config, run_dir: Path):
    save_dir = Path(config.checkpointing.save_dir)
    lock = None if runtime.is_launched_rank() else checkpoints.RunLock(save_dir).acquire()
    try:
        return _train(config, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(config, run_dir: Path):
    last = Path(config.checkpointing.save_dir) / 'checkpoints' / checkpoints.LAST
    resuming = bool(config.checkpointing.resume) and last.exists()
    source = None
    if not resuming and config.training.finetune_path:  # read first: the checkpoint sets the model sizes
        source = read_finetune(config)
    elif not resuming and config.algo.name == 'distillation':
        log.warning('algo=distillation without training.finetune_path distils an untrained model; '
                    'pass training.finetune_path=<the trained DUO checkpoint>')
    tokenizer = dataloader.get_tokenizer(config)
    model = build_model(config, tokenizer)  # before the data: a bad model or checkpoint is reported at once
    resume_step = micro_step = 0
    if resuming:
        resume_step, micro_step = checkpoints.check_resumable(last, model)
    elif source is not None:
        checkpoints.start_from(model, source)
    train_loader, valid_loader = dataloader.get_dataloaders(config, tokenizer)
    check_training_blocks(config, train_loader.batch_sampler)
    train_loader.batch_sampler.start = micro_step  # continue after the batches the checkpoint trained on
    budget = settings.max_time_seconds(config.trainer.max_time)
    stop = callbacks.GracefulStop(None if budget is None else STARTED + budget)
    trainer = build_trainer(config, run_dir, for_training=True, resume_step=resume_step, stop=stop,
                            tokenizer=tokenizer)
    cli.begin_run(config, run_dir)
    log.info('Training algo=%s, %s, %.1fM parameters; %s', config.algo.name, config.trainer.precision,
             sum(p.numel() for p in model.backbone.parameters()) / 1e6, settings.batch_summary(config))
    if resuming:
        log.info('Resuming from %s (step %d, after %d batches)', last, resume_step, micro_step)
    try:
        trainer.fit(model, train_loader, valid_loader, ckpt_path=str(last) if resuming else None)
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


def ppl_eval(config, run_dir: Path):
    """The likelihood bound on data's validation split, or on every set of eval.datasets (one table,
    one JSON: {'checkpoint', 'algo', 'datasets': {name: {nll, ppl, bpd, tokens, data}}})."""
    tokenizer, model = load_for_eval(config)
    several = config.eval.datasets is not None
    sets = (dataloader.eval_data_configs(config, settings.explicit_keys(cli.explicit_overrides())) if several
            else {config.data.name: config.data})
    loaders, own = {}, config.data
    for name, data in sets.items():  # every set tokenized (and checked) before anything is written
        with open_dict(config):
            config.data = data
        loaders[name] = dataloader.get_dataloaders(config, tokenizer)[1]
    with open_dict(config):
        config.data = own
    trainer = build_trainer(config, run_dir, for_training=False)
    cli.begin_run(config, run_dir)
    results = {}
    for name, loader in loaders.items():
        values = trainer.validate(model, loader, verbose=False)[0]
        results[name] = {'nll': values['val/nll'], 'ppl': values['val/ppl'], 'bpd': values['val/bpd'],
                         'tokens': int(values['val/tokens']), 'data': dataloader.describe(sets[name], 'validation')}
    about = {'checkpoint': str(config.eval.checkpoint_path), 'algo': config.algo.name}
    if several:
        result = {**about, 'datasets': results}
        print(f"{'dataset':26} {'tokens':>11} {'nll':>8} {'ppl':>10} {'bpd':>7}")
        for name, r in results.items():
            print(f"{name:26} {r['tokens']:11d} {r['nll']:8.4f} {r['ppl']:10.3f} {r['bpd']:7.4f}")
    else:
        result = {**results[config.data.name], **about}
        print(json.dumps(result, indent=2))
    write_json(config.eval.results_path, result)
    log.info('Wrote %s', config.eval.results_path)
    return result


def sample_eval(config, run_dir: Path):
    """Samples (unconditional, or continuing sampling.prompt / sampling.prompts_file) through the
    Python API's Model.sample, their entropy and generative perplexity -> samples.json."""
    tokenizer, module = load_for_eval(config)
    model = duo.Model(config, tokenizer, module)
    batch = int(config.loader.eval_batch_size)
    rows = batch * int(config.sampling.num_sample_batches)
    templates = conditioning.from_settings(config.sampling, tokenizer)
    if templates is not None and len(templates) > rows:
        raise ConfigError(f"sampling.prompts_file={config.sampling.prompts_file} holds {len(templates)} prompts but "
                          f"loader.eval_batch_size={batch} x sampling.num_sample_batches="
                          f"{config.sampling.num_sample_batches} draws {rows} rows: draw at least one row per "
                          f"prompt (e.g. sampling.num_sample_batches={-(-len(templates) // batch)})")
    fixed = model.canvas(templates, rows)  # a template that cannot be sampled fails here, before any file
    model.width()
    cli.begin_run(config, run_dir)
    torch.manual_seed(config.seed)
    samples = model.sample(rows, templates, fixed=fixed, batch_size=batch, progress=True)
    record = samples.record()
    texts = record['generated_seqs']
    path = config.eval.generated_samples_path
    # Prompted samples: entropy and generative perplexity describe the generated tokens only.
    scored = 'sample' if templates is None else 'continuation'
    result = {'generative_ppl': None, 'entropy': metrics.sample_entropy(samples.generated_ids()), 'scored': scored,
              'algo': config.algo.name, 'steps': int(config.sampling.steps),
              'checkpoint': str(config.eval.checkpoint_path), 'tokenizer': str(config.data.tokenizer_name_or_path),
              **record}
    write_json(path, result)  # before the judge loads: the samples are never lost
    for text in texts[:3]:
        print('-' * 80 + '\n' + text)
    print('-' * 80)
    if config.eval.compute_generative_perplexity:
        judge_name = str(config.eval.gen_ppl_eval_model_name_or_path)
        try:
            judge = metrics.GenerativePerplexity(judge_name, device=model.device,
                                                 batch_size=int(config.eval.perplexity_batch_size), tokenizer=tokenizer)
        except ValueError as e:
            log.warning('No generative perplexity: %s. The samples are saved; judge them later with: '
                        'python metrics.py %s --judge <a local judge directory or AR checkpoint>', e, path)
        else:
            result['generative_ppl'] = judge.compute(texts, eos_token=tokenizer.eos_token, token_ids=samples.token_ids,
                                                     generated=samples.generated())
            result['judge'] = judge_name
            write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k in SUMMARY}, indent=2))
    log.info('Wrote %d samples to %s', len(texts), path)
    return result


# What sample_eval prints of samples.json (the per-row fields are in the file).
SUMMARY = ('generative_ppl', 'entropy', 'scored', 'algo', 'steps', 'checkpoint', 'tokenizer', 'judge')


MODES = {'train': train, 'ppl_eval': ppl_eval, 'sample_eval': sample_eval}


@hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent / 'configs'), config_name='config')
def main(config: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    def mode(config, run_dir):
        config = settings.resolve(config)
        L.seed_everything(config.seed, verbose=False)
        return MODES[config.mode](config, run_dir)
    return cli.run(mode, config, run_dir)


if __name__ == '__main__':
    cli.main(main)
