"""Text that needs no download: the built-in corpus (`data=stdlib`).

The standard library's docstrings (module, class and function documentation of every pure-Python
stdlib module this interpreter ships) are real English prose with code examples, present on
every Python installation, so the quickstart and the tests can train without a hub.
"""
import ast
import json
import os
import sysconfig
import tempfile
from pathlib import Path

# Test suites and GUI demos are mostly code; vendored third-party packages are not stdlib prose.
_SKIP_DIRS = {'site-packages', 'dist-packages', 'test', 'tests', 'idlelib', 'lib2to3', 'turtledemo'}
MIN_CHARS = 200  # shorter docstrings are mostly one-line signatures


def stdlib_docstrings() -> list[str]:
    """Docstrings of at least MIN_CHARS characters from the stdlib sources, in a fixed order."""
    root = Path(sysconfig.get_paths()['stdlib'])
    docs = []
    for path in sorted(root.rglob('*.py')):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding='utf-8'))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    docs.append(doc)
    return docs


def stdlib_corpus_file(cache_dir: Path) -> Path:
    """The stdlib docstrings as `<cache_dir>/stdlib-py<version>.jsonl` (extracted once, atomically)."""
    version = sysconfig.get_python_version()
    path = Path(cache_dir) / f'stdlib-py{version}.jsonl'
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
        try:
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                for doc in stdlib_docstrings():
                    f.write(json.dumps({'text': doc}) + '\n')
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
