"""cli.py and settings.py: the command line's one-line errors, explicit settings, batch summaries,
and the Hydra/W&B internals they rely on (these fail loudly when a release changes them)."""
import inspect

import hydra._internal.utils as hydra_utils
import pytest
from hydra import compose, initialize_config_dir

import cli
import errors
import settings
from conftest import ROOT


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=['trainer.accelerator=cpu', *overrides])


def test_hydras_run_and_report_is_still_the_hook_for_command_line_errors():
    """cli.main wraps hydra._internal.utils.run_and_report (no public hook exists): it must still be
    a function of one argument, called with the function that runs the job."""
    assert list(inspect.signature(hydra_utils.run_and_report).parameters) == ['func']
    wrapped = cli.report_hydra_errors(lambda func: func())
    assert wrapped(lambda: 7) == 7 and wrapped.one_line


def test_lightning_still_passes_wandbs_deprecated_anonymous_setting():
    """main.build_trainer drops it from WandbLogger's private init arguments, which must exist."""
    pytest.importorskip('wandb')
    from lightning.pytorch.loggers import WandbLogger
    logger = WandbLogger(project='p', offline=True)
    assert 'anonymous' in logger._wandb_init


def test_explicit_keys_and_the_batch_summary():
    assert settings.explicit_keys(['model=tiny', '+x.y=1', 'model.length=8', '~z']) == {'model', 'x.y', 'model.length'}
    config = settings.resolve(make_config('loader.batch_size=2', 'model.length=512'))
    assert settings.batch_summary(config) == 'global batch 512 = 2 per device x 1 device x 256 accumulation steps'
    assert config.loader.eval_batch_size == 2  # evaluation in training: the training batch per device


@pytest.mark.parametrize('key,value', [('sampling.predictor', 'ancestal'), ('sampling.noise_removal', 'greed'),
                                       ('algo.backbone', 'unet'), ('strategy.name', 'deepspeed')])
def test_enumerated_settings_are_checked_with_one_line(key, value):
    with pytest.raises(errors.ConfigError, match=rf'^{key}={value} is unknown: use one of .* \(e\.g\. {key}=\S+\)$'):
        settings.resolve(make_config(f'{key}={value}'))
