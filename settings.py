"""The configuration a run uses: derived settings filled in, every bad value refused with one line.

`resolve(config)` checks what the command line can get wrong (numbers, ranges, enumerated keys,
time formats), derives per-device batch sizes and gradient accumulation, and resolves the
accelerator and precision (runtime.py decides those). Everything here is pure configuration:
nothing is read from disk and nothing is written.
"""
import re

from omegaconf import DictConfig, OmegaConf, open_dict

import noise_schedule
import runtime
import samplers
from errors import ConfigError

MODES = ('train', 'ppl_eval', 'sample_eval')
# Enumerated settings: {key: (allowed values, example)}. Algorithm-specific ones are checked by
# their algorithm (algorithms.py), data ones by dataloader.py.
CHOICES = {
    'sampling.predictor': (('ancestral', 'ancestral_cache', 'psi', 'remdm-conf'), 'ancestral'),
    'sampling.noise_removal': (('ancestral', 'greedy', 'none'), 'ancestral'),
    'algo.backbone': (('dit', 'hf_dit'), 'dit'),
    'model.attn_backend': (runtime.ATTN_BACKENDS, 'auto'),
    'strategy.name': (('single', 'ddp', 'fsdp'), 'ddp'),
    'lr_scheduler.name': (('constant_warmup', 'cosine_decay_warmup'), 'constant_warmup'),
    'noise.type': (('log-linear', 'cosine'), 'log-linear'),
}


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


def check_choice(config, key: str, choices, example):
    value = OmegaConf.select(config, key)
    if value not in choices:
        raise ConfigError(f"{key}={value} is unknown: use one of {', '.join(map(str, choices))} (e.g. {key}={example})")


def max_time_seconds(value) -> int | None:
    """trainer.max_time (DD:HH:MM:SS, as Lightning spells it) in seconds; None when unset."""
    if value is None or str(value).strip() in ('', 'None', 'null'):
        return None
    match = re.fullmatch(r'(\d+):(\d\d):(\d\d):(\d\d)', str(value).strip())
    if not match:
        raise ConfigError(f"trainer.max_time={value} is not DD:HH:MM:SS (e.g. trainer.max_time=00:11:30:00)")
    days, hours, minutes, seconds = map(int, match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def resolve(config: DictConfig) -> DictConfig:
    """Fill the derived settings (batch sizes, accumulation, accelerator, precision) and reject bad values."""
    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode} is unknown: use one of {', '.join(MODES)} (e.g. mode=train)")
    for key, example in (('loader.global_batch_size', 512), ('loader.eval_global_batch_size', 512),
                         ('trainer.num_nodes', 1)):
        if setting_int(config, key, example) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= 1 (e.g. {key}={example})")
    for key in ('loader.batch_size', 'loader.eval_batch_size', 'trainer.accumulate_grad_batches'):
        if OmegaConf.select(config, key) is not None and setting_int(config, key, 8) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= 1 (e.g. {key}=8)")
    for key, (choices, example) in CHOICES.items():
        check_choice(config, key, choices, example)
    t, loader = config.trainer, config.loader
    accelerator = runtime.resolve_accelerator(t.accelerator)
    world = runtime.world_size(t)
    with open_dict(config):
        t.accelerator = accelerator
        t.precision = runtime.resolve_precision(t.precision, accelerator)
        if loader.batch_size is None:
            loader.batch_size = max(int(loader.global_batch_size) // world, 1)
        if loader.eval_batch_size is None:
            # Training: the training batch per device (what fits for training fits for evaluation).
            # Evaluation: the global evaluation batch; validation splits it into blocks whose logits
            # stay within runtime.max_logit_elements, so it never runs out of memory.
            loader.eval_batch_size = (int(loader.batch_size) if config.mode == 'train' else
                                      max(int(loader.eval_global_batch_size) // world, 1))
        per_step = int(loader.batch_size) * world
        if t.accumulate_grad_batches is None:
            if int(loader.global_batch_size) % per_step:
                raise ConfigError(
                    f"loader.global_batch_size={loader.global_batch_size} is not divisible by loader.batch_size x "
                    f"devices x nodes = {per_step}: use e.g. loader.global_batch_size="
                    f"{per_step * max(int(loader.global_batch_size) // per_step, 1)}")
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
        raise ConfigError(f"sampling.p_nucleus={config.sampling.p_nucleus} must be in (0, 1] "
                          f"(e.g. sampling.p_nucleus=0.9)")
    if setting_int(config, 'sampling.num_sample_batches', 2) < 1:
        raise ConfigError(f"sampling.num_sample_batches={config.sampling.num_sample_batches} must be >= 1 "
                          f"(e.g. sampling.num_sample_batches=2)")
    check_psi(config)
    if config.mode == 'train':
        for key, low, example in (('trainer.max_steps', 1, 100000), ('checkpointing.every_n_train_steps', 1, 5000),
                                  ('checkpointing.keep_last', 0, 3), ('training.max_nonfinite_steps', 1, 25)):
            if setting_int(config, key, example) < low:
                raise ConfigError(f"{key}={OmegaConf.select(config, key)} must be >= {low} (e.g. {key}={example})")
        if not 0 <= setting_float(config, 'training.ema', 0.9999) < 1:
            raise ConfigError(f"training.ema={config.training.ema} must be in [0, 1) (0 = no EMA; "
                              f"e.g. training.ema=0.9999)")
        max_time_seconds(t.max_time)
    return config


def check_psi(config):
    """sampling.psi.*, before any checkpoint or model loads: the kappa modes and fractions always (a
    typo fails at once), and with sampling.predictor=psi the whole schedule of sampling.steps on the
    configured noise schedule (a checkpoint's own schedule can only move an '-inv' plateau: the
    algorithm builds the schedule again from it, algorithms._Diffusion)."""
    psi = config.sampling.psi
    for key in ('rescale_compat', 'negative_kappa'):
        if not isinstance(psi[key], bool):
            raise ConfigError(f"sampling.psi.{key}={psi[key]} must be true or false (e.g. sampling.psi.{key}=false)")
    for key, example in (('high_frac', 0.2), ('middle_frac', 0.6)):
        setting_float(config, f'sampling.psi.{key}', example)
    try:
        for key in ('high_mode', 'middle_mode', 'low_mode'):
            samplers.parse_kappa_mode(psi[key], f'sampling.psi.{key}')
        samplers.psi_segment_sizes(1, float(psi.high_frac), float(psi.middle_frac))
        if config.sampling.predictor == 'psi':
            samplers.psi_schedule(int(config.sampling.steps), noise_schedule.get_schedule(config.noise).alpha,
                                  **psi_arguments(config.sampling))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def psi_arguments(sampling) -> dict:
    """The keyword arguments of samplers.psi_schedule from sampling.psi.* (the keys are its arguments)."""
    return {key: (float(value) if key.endswith('_frac') else value) for key, value in sampling.psi.items()}


def batch_summary(config) -> str:
    """How the global batch is formed, e.g. 'global batch 512 = 2 per device x 1 device x 256
    accumulation steps'."""
    world = runtime.world_size(config.trainer)
    accumulation = int(config.trainer.accumulate_grad_batches)
    return (f'global batch {config.loader.global_batch_size} = {config.loader.batch_size} per device x {world} '
            f'device{"s" if world > 1 else ""} x {accumulation} accumulation step{"s" if accumulation > 1 else ""}')


def explicit_keys(overrides) -> frozenset:
    """The settings a command line gives explicitly: ['model=tiny', '+x.y=1', 'model.length=8'] ->
    {'model', 'x.y', 'model.length'}."""
    return frozenset(o.split('=', 1)[0].lstrip('+~') for o in overrides if '=' in o)
