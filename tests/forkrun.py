"""Run `main.py` commands as forked children of one process that has imported main (torch,
Lightning, Hydra, transformers) once, so that the kill tests pay the import time once rather than
for every command; each child runs exactly what `python main.py ...` runs after its imports.

Protocol, one JSON line per command on stdin: {"argv": [...overrides], "log": "<file for the
child's stdout and stderr>"}. For each, this prints `pid <pid>` when the child has started and
`exit <code>` when it has ended (a signal N gives -N). End of stdin ends the runner.
"""
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import cli  # noqa: E402  (after the path is set)
import main  # noqa: E402
import callbacks  # noqa: E402,F401  (imported in the parent so that children start at once)
import dataloader  # noqa: E402,F401
import diffusion  # noqa: E402,F401
import lightning.pytorch  # noqa: E402,F401


def child(argv, log_path):
    """The forked child: never returns (os._exit), so it can never go on with the parent's loop."""
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.argv = ['main.py', *argv]
        cli.main(main.main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request['argv'], request['log'])
        print(f'pid {pid}', flush=True)
        _, status = os.waitpid(pid, 0)
        print(f'exit {os.waitstatus_to_exitcode(status)}', flush=True)


if __name__ == '__main__':
    serve()
