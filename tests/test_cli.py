"""cli.py: the command line's one-line errors and the Hydra/W&B internals they rely on (these fail
loudly when a release changes them)."""
import inspect

import hydra._internal.utils as hydra_utils
import pytest

import cli


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
