"""The command line around main.py's modes: Hydra's errors as one line, the run's log file held back
until the inputs are valid, exit codes, and the hub check.

Exit codes: 0 done; 2 bad input (one line on stderr naming the setting; nothing written);
1 a run that started and cannot go on (errors.RunStopped); 128 + N on signal N.
The traceback is printed only with HYDRA_FULL_ERROR=1.
"""
import logging
import logging.handlers
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from omegaconf import OmegaConf

import runtime
from atomic import write_text
from errors import RunStopped

log = logging.getLogger('duo')
CONFIG_DIR = Path(__file__).resolve().parent / 'configs'
GROUPS = ('algo', 'data', 'model', 'noise', 'lr_scheduler', 'strategy')


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
    """One line on stderr and the exit code."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(code)


def quiet_libraries():
    """One log format (Hydra's, also written to <run dir>/main.log) and no third-party chatter."""
    import lightning  # noqa: F401  (installs its own console handler on import; drop it)
    logging.getLogger('lightning').handlers.clear()
    logging.getLogger('lightning.pytorch.utilities.rank_zero').addFilter(
        lambda record: 'litlogger' not in record.getMessage())
    warnings.filterwarnings('ignore', message='.*isinstance\\(treespec, LeafSpec\\)')
    # A resumed run writes into its own checkpoint directory on purpose.
    warnings.filterwarnings('ignore', message='.*Checkpoint directory .* exists and is not empty')


def run(mode_fn, config, run_dir: Path):
    """Run one mode with the exit codes of this module's docstring."""
    global _RUN_LOG
    quiet_libraries()
    _RUN_LOG = RunLog(run_dir)
    full_error = os.environ.get('HYDRA_FULL_ERROR') == '1'
    try:
        return mode_fn(config, run_dir)
    except ValueError as e:  # ConfigError, CheckpointError, DataError and the model's own checks
        _RUN_LOG.discard()
        if full_error:
            raise
        fail(str(e), 2)
    except RunStopped as e:  # no disk space, non-finite values, a run directory in use
        _RUN_LOG.discard()
        log.error('%s', e)
        if full_error:
            raise
        fail(str(e), 1)
    except KeyboardInterrupt:  # before training began (GracefulStop handles it during training)
        log.warning('Interrupted before training began: nothing was saved')
        _RUN_LOG.discard()
        fail('interrupted', 128 + signal.SIGINT)


def explicit_overrides() -> list[str]:
    """The overrides of this command line (Hydra's), e.g. ['model=tiny', 'model.length=8']."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ---- one-line messages for Hydra's own errors ----------------------------------------------
def hydra_error_line(error: Exception) -> str:
    """Hydra/OmegaConf's multi-line message for a bad command line as one line with an example."""
    from hydra.errors import MissingConfigException
    if isinstance(error, MissingConfigException):
        text = str(error)
        group = next((g for g in GROUPS if f"'{g}/" in text), None)
        if group is not None:
            name = text.split(f"'{group}/", 1)[1].split("'", 1)[0]
            options = sorted(p.stem for p in (CONFIG_DIR / group).glob('*.yaml'))
            default = OmegaConf.load(CONFIG_DIR / 'config.yaml').defaults
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


def main(hydra_main):
    """`python main.py ...`: hydra_main() with one-line messages for bad command lines, and offline
    from the start when the Hugging Face hub cannot be reached (checked once, in seconds)."""
    # Hydra's public API has no hook for how a command-line error is reported (tests/test_cli.py
    # fails loudly if this private function changes).
    import hydra._internal.utils as hydra_utils
    if not getattr(hydra_utils.run_and_report, 'one_line', False):
        hydra_utils.run_and_report = report_hydra_errors(hydra_utils.run_and_report)
    if not runtime.is_launched_rank():  # DDP ranks inherit the launcher's environment
        runtime.go_offline_if_unreachable()
    hydra_main()
