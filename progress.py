"""Progress that every log shows: a bar on a terminal, else one line every few seconds.

Kaggle's "Save & Run All", nohup, CI logs and notebooks' captured output are not terminals: a
terminal bar there prints nothing until the end (or a wall of carriage returns). `steps` yields
the items of an iterable and reports how far it got; `Reporter` does the same for loops it does not
own (Lightning's training loop, see callbacks.ProgressLog).
"""
import logging
import os
import sys
import time

log = logging.getLogger('duo')
EVERY_SECONDS = float(os.environ.get('DUO_PROGRESS_SECONDS', 10))


def interactive() -> bool:
    """A person watches a terminal (a bar redraws in place there)."""
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


class Reporter:
    """Counts `done` of `total` (None: unknown) and reports every EVERY_SECONDS seconds, or draws a
    tqdm bar on a terminal. `extra()` adds text to a line (e.g. the loss)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = 'it', extra=lambda: '', start: int = 0):
        self.desc, self.total, self.unit, self.extra = desc, total, unit, extra
        self.done = self.first = start
        self.started = self.last = time.monotonic()
        self.bar = None
        if interactive():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            text = self.extra()
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            return
        self.poll()

    def poll(self):
        """Report without advancing (e.g. inside a long step), at most every EVERY_SECONDS."""
        now = time.monotonic()
        if self.bar is None and now - self.last >= EVERY_SECONDS:
            self.last = now
            log.info('%s', self.line(now))

    def line(self, now: float) -> str:
        rate = (self.done - self.first) / max(now - self.started, 1e-9)
        parts = [f'{self.desc}: {self.done}' + (f'/{self.total}' if self.total else '') + f' {self.unit}']
        text = self.extra()
        if text:
            parts.append(text)
        parts.append(f'{rate:.3g} {self.unit}/s')
        if self.total and rate > 0:
            parts.append(f'ETA {duration((self.total - self.done) / rate)}')
        return ' | '.join(parts)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.first:
            log.info('%s (done in %s)', self.line(time.monotonic()), duration(time.monotonic() - self.started))


def steps(iterable, desc: str, total: int | None = None, unit: str = 'it', enabled: bool = True):
    """The items of `iterable`, reporting progress as Reporter does (nothing when not enabled)."""
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, '__len__'):
        total = len(iterable)
    reporter = Reporter(desc, total, unit)
    try:
        for item in iterable:
            yield item
            reporter.update()
    finally:
        reporter.close()
