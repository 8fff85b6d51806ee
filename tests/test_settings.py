"""settings.py: enumerated settings, explicit keys and the batch summary; the sampling.psi.* keys
are checked when the config resolves, before any checkpoint or model loads (SPEC-2 §13), with one
line naming the key and a valid example."""
import pytest
from hydra import compose, initialize_config_dir

import settings
from conftest import ROOT
from errors import ConfigError


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=['trainer.accelerator=cpu', *overrides])


def resolve(*overrides):
    return settings.resolve(compose_config('mode=sample_eval', *overrides))


def test_explicit_keys_and_the_batch_summary():
    assert settings.explicit_keys(['model=tiny', '+x.y=1', 'model.length=8', '~z']) == {'model', 'x.y', 'model.length'}
    config = settings.resolve(compose_config('loader.batch_size=2', 'model.length=512'))
    assert settings.batch_summary(config) == 'global batch 512 = 2 per device x 1 device x 256 accumulation steps'
    assert config.loader.eval_batch_size == 2  # evaluation in training: the training batch per device


@pytest.mark.parametrize('key,value', [('sampling.predictor', 'ancestal'), ('sampling.noise_removal', 'greed'),
                                       ('algo.backbone', 'unet'), ('strategy.name', 'deepspeed')])
def test_enumerated_settings_are_checked_with_one_line(key, value):
    with pytest.raises(ConfigError, match=rf'^{key}={value} is unknown: use one of .* \(e\.g\. {key}=\S+\)$'):
        settings.resolve(compose_config(f'{key}={value}'))




PSI = 'sampling.predictor=psi'


@pytest.mark.parametrize('overrides, message', [
    (['sampling.psi.high_mode=max-caped-0.01'],
     'sampling.psi.high_mode=max-caped-0.01 is unknown: use one of pure-posterior, pure-pc, constant-<eta>, '
     'constant-remdm-<eta>, max-capped-<eta>, max-rescale-<eta> (e.g. sampling.psi.high_mode=pure-posterior)'),
    (['sampling.psi.middle_mode=constant-remdm-eta'],
     "sampling.psi.middle_mode=constant-remdm-eta: 'eta' after 'constant-remdm-' must be a number >= 0 "
     "(e.g. sampling.psi.middle_mode=constant-remdm-0.01)"),
    (['sampling.psi.low_mode=constant-1.5'],
     "sampling.psi.low_mode=constant-1.5: '1.5' after 'constant-' must be a number in [0, 1] "
     "(e.g. sampling.psi.low_mode=constant-0.01)"),
    (['sampling.psi.high_frac=-0.1'], 'sampling.psi.high_frac=-0.1 must be in [0, 1] (e.g. sampling.psi.high_frac=0.5)'),
    (['sampling.psi.middle_frac=half'], 'sampling.psi.middle_frac=half must be a number (e.g. sampling.psi.middle_frac=0.6)'),
    (['sampling.psi.rescale_compat=maybe'],
     'sampling.psi.rescale_compat=maybe must be true or false (e.g. sampling.psi.rescale_compat=false)'),
    ([PSI, 'sampling.psi.time_profile=cosine'],
     'sampling.psi.time_profile=cosine is unknown: use one of linear, linear-constant-linear-<c>, '
     'linear-constant-linear-<alpha level>-inv (e.g. sampling.psi.time_profile=linear-constant-linear-0.9-inv)'),
    ([PSI, 'sampling.psi.time_profile=linear-constant-linear-x-inv'],
     "sampling.psi.time_profile=linear-constant-linear-x-inv: 'x' after 'linear-constant-linear-' must be a number "
     "(e.g. sampling.psi.time_profile=linear-constant-linear-0.9-inv)"),
    ([PSI, 'sampling.psi.high_frac=0.7', 'sampling.psi.middle_frac=0.6'],
     'sampling.psi.high_frac=0.7 + sampling.psi.middle_frac=0.6 must not exceed 1 '
     '(e.g. sampling.psi.high_frac=0.2 sampling.psi.middle_frac=0.6)'),
])
def test_bad_psi_settings_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        resolve(*overrides)
    assert str(error.value) == message


def test_mode_strings_are_checked_whatever_the_predictor():
    """A typo in sampling.psi.* is reported even when another predictor runs (it would be silently unused)."""
    with pytest.raises(ConfigError, match='sampling.psi.low_mode=pure_posterior is unknown'):
        resolve('sampling.predictor=ancestral', 'sampling.psi.low_mode=pure_posterior')


def test_the_schedule_is_checked_for_psi_only():
    """The loop profile needs points in its high and low segments: 4 steps -> 5 points, fracs 0.6 / 0.4
    give n_lo = 0. That depends on sampling.steps, so it only matters when psi samples."""
    loop = ['sampling.steps=4', 'sampling.psi.time_profile=linear-constant-linear-0.9-inv',
            'sampling.psi.high_frac=0.6', 'sampling.psi.middle_frac=0.4']
    resolve('sampling.predictor=ancestral', *loop)
    with pytest.raises(ConfigError) as error:
        resolve(PSI, *loop)
    assert str(error.value) == (
        'sampling.psi.time_profile=linear-constant-linear-0.9-inv needs at least one point in the high and the low '
        'segments; sampling.steps=4, sampling.psi.high_frac=0.6 and sampling.psi.middle_frac=0.4 give 3 and 0 '
        '(e.g. sampling.psi.high_frac=0.45 sampling.psi.middle_frac=0.5)')


def test_psi_arguments_are_the_keys_of_psi_schedule():
    config = resolve(PSI, 'sampling.psi.high_frac=0', 'sampling.psi.middle_mode=constant-remdm-0.01')
    assert settings.psi_arguments(config.sampling) == {
        'time_profile': 'linear', 'high_mode': 'pure-posterior', 'middle_mode': 'constant-remdm-0.01',
        'low_mode': 'pure-posterior', 'high_frac': 0.0, 'middle_frac': 0.6, 'rescale_compat': False,
        'negative_kappa': False}
    assert isinstance(settings.psi_arguments(config.sampling)['high_frac'], float)


def test_every_config_key_is_read_somewhere():
    """Each key of configs/ (Hydra's own hydra.* aside) is named in the code as an attribute or a
    string ('.key', "'key'", '[key'): a key nothing reads would be a setting that silently does
    nothing. A coarse static check: it catches keys added and never wired, not wrong wiring."""
    import re
    from omegaconf import OmegaConf
    source = ''.join(path.read_text() for pattern in ('*.py', 'models/*.py') for path in ROOT.glob(pattern))

    def leaves(node, prefix=''):
        for key in node.keys():
            value = node._get_node(key)
            yield from leaves(value, f'{prefix}{key}.') if OmegaConf.is_dict(value) else [f'{prefix}{key}']
    unread = [f'{path.relative_to(ROOT)}: {key}' for path in sorted((ROOT / 'configs').rglob('*.yaml'))
              for key in leaves(OmegaConf.load(path)) if not key.startswith('hydra.') and key != 'defaults'
              and not re.search(r"[.'\"\[]" + re.escape(key.split('.')[-1]) + r"\b", source)]
    assert not unread, unread
