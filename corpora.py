"""Where documents come from (SPEC §2): local files, files of a Hugging Face dataset, URLs, built-in text.

A `FileSet` names files: local paths/globs/directories, files of a hub dataset repository
(`hf://datasets/<repo>@<revision>/<pattern>`), web URLs (downloaded once into the cache), or a
built-in corpus (`builtin:stdlib`). A `DocumentSource` reads the texts of a range of the
documents of a FileSet, in order and streaming: parquet through pyarrow (only the text column;
files and row groups before the range are skipped unread), JSON lines and plain text line by
line, compressed files (.gz, .bz2, .xz, .zst) transparently, zip archives member by member.
Nothing after the range is read, so `OWT_SUBSET_NUM=N` reads N documents of OpenWebText and no more.

Plain text files divide into documents by `txt_document`: paragraph (blank-line separated),
line, or file. Character mode (text8) instead joins the documents into one text and cuts the
fraction `char_range` of it into pieces of `char_chunk` characters (the partial last piece is dropped).

The built-in corpus: the standard library's docstrings (module, class and function documentation
of every pure-Python stdlib module this interpreter ships) are real English prose with code
examples, present on every Python installation, so the quickstart and the tests can train
without a hub (`data=stdlib`).
"""
import ast
import bz2
import functools
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import sysconfig
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from atomic import atomic_write
from errors import DataError

log = logging.getLogger(__name__)


# ---- the built-in corpus -------------------------------------------------------------------
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
        docs = stdlib_docstrings()
        atomic_write(path, lambda f: f.writelines(json.dumps({'text': doc}) + '\n' for doc in docs), mode='w')
    return path


BUILTIN = {'stdlib': stdlib_corpus_file}  # `builtin:<name>` -> function(cache_dir) -> local file


# ---- naming files --------------------------------------------------------------------------
def hub_url(repo: str, pattern: str, revision: str | None = None) -> str:
    """`hf://datasets/<repo>[@<revision>]/<pattern>`; the revision is quoted (refs/convert/parquet)."""
    rev = f'@{urllib.parse.quote(str(revision), safe="")}' if revision else ''
    return f'hf://datasets/{repo}{rev}/{pattern.lstrip("/")}'


def _kind(item: str) -> str:
    if item.startswith('hf://'):
        return 'hub'
    if '://' in item:
        return 'url'
    if item.startswith('builtin:'):
        return 'builtin'
    return 'local'


@dataclass(frozen=True)
class FileSet:
    """Files named by `items` (each a local path/glob/directory, hf:// pattern, URL or builtin:NAME).

    `setting` is the configuration key the items came from (for error messages);
    `cache_dir` receives downloads of URLs and the built-in corpus.
    """

    items: tuple[str, ...]
    setting: str
    cache_dir: str

    def identity(self) -> list:
        """What the contents depend on: local files with their size and modification time,
        other items by name (a hub revision or URL names fixed content)."""
        out = []
        for item in self.items:
            if _kind(item) in ('local', 'builtin'):
                out += [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self._expand(item)]
            else:
                out.append(item)
        return out

    def files(self) -> list[str]:
        """The files, in order: items in the given order, each item's matches sorted by name."""
        return [f for item in self.items for f in self._expand(item)]

    def _expand(self, item: str) -> list[str]:
        kind = _kind(item)
        if kind == 'builtin':
            name = item.removeprefix('builtin:')
            if name not in BUILTIN:
                raise DataError(f'{self.setting}={item}: no built-in corpus {name!r}; '
                                f'available: {", ".join("builtin:" + n for n in BUILTIN)}')
            return [str(BUILTIN[name](Path(self.cache_dir)))]
        if kind == 'url':
            return [str(download(item, Path(self.cache_dir) / 'downloads'))]
        if kind == 'hub':
            return _hub_glob(item, self.setting)
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            matches = sorted(p for p in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                             if os.path.isfile(p) and not os.path.basename(p).startswith('.'))
        else:
            matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not matches:
            raise DataError(f'{self.setting}={item} matches no files; give a path, directory or glob of '
                            f'.parquet, .jsonl or .txt files, e.g. {self.setting}=/kaggle/input/owt/*.parquet')
        return matches

    def open(self, path: str):
        """A binary file object for one of `files()`."""
        if path.startswith('hf://'):
            try:
                return _hub_fs().open(path, 'rb')
            except FileNotFoundError:
                raise
            except Exception as e:  # offline mode, DNS, HTTP errors: one clear line
                raise hub_error(path, e) from None
        return open(path, 'rb')


def hub_error(what: str, error: Exception) -> DataError:
    first = (str(error).splitlines() or [''])[0]
    first = first if len(first) <= 160 else first[:157] + '...'
    return DataError(f'cannot read {what} from the Hugging Face hub ({type(error).__name__}: {first}); '
                       'without internet point data.data_files at local copies of the files '
                       '(.parquet/.jsonl/.txt, e.g. data.data_files=/kaggle/input/owt/*.parquet) '
                       'or use data=local data.train_files=<files>')


def _hub_fs():
    from huggingface_hub import HfFileSystem
    return HfFileSystem()


@functools.lru_cache(maxsize=None)  # one listing per pattern and process (counting and reading both need it)
def _hub_glob(item: str, setting: str) -> tuple[str, ...]:
    try:
        matches = sorted(_hub_fs().glob(item.removeprefix('hf://')))
    except Exception as e:
        raise hub_error(item, e) from None
    if not matches:
        raise DataError(f'{setting}: {item} matches no files on the Hugging Face hub; '
                        'check data.hub_path / data.hub_revision / the file pattern')
    return tuple('hf://' + m for m in matches)


def download(url: str, directory: Path) -> Path:
    """`url` saved once as `<directory>/<hash>-<name>` (atomically: a killed download is never used)."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    path = directory / f'{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}'
    if path.exists():
        return path
    log.info('Downloading %s', url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            atomic_write(path, lambda out: shutil.copyfileobj(response, out, 1 << 20))
    except OSError as e:
        raise DataError(f'cannot download {url} ({type(e).__name__}: {e}); without internet point '
                        f'data.data_files at a local copy of {name}') from None
    return path


# ---- reading files -------------------------------------------------------------------------
_COMPRESSED = {'.gz': gzip.GzipFile, '.bz2': bz2.BZ2File, '.xz': lzma.LZMAFile}
_FORMATS = {'.parquet': 'parquet', '.jsonl': 'json', '.json': 'json', '.ndjson': 'json',
            '.txt': 'text', '.text': 'text', '.raw': 'text', '': 'text', '.zip': 'zip'}


def file_format(name: str) -> tuple[str, str | None]:
    """(format, compression suffix or None) of a file name: parquet | json | text | zip."""
    base = name.lower()
    compression = next((ext for ext in (*_COMPRESSED, '.zst') if base.endswith(ext)), None)
    if compression:
        base = base[:-len(compression)]
    suffix = os.path.splitext(os.path.basename(base))[1]
    if suffix not in _FORMATS or (compression and _FORMATS[suffix] in ('parquet', 'zip')):
        raise DataError(f'cannot read {name}: use .parquet, .jsonl (.json) or .txt files, optionally '
                        '.gz/.bz2/.xz/.zst compressed, or a .zip of them')
    return _FORMATS[suffix], compression


def _decompress(raw, compression: str | None):
    if compression is None:
        return raw
    if compression == '.zst':
        try:
            import zstandard
        except ImportError:
            raise DataError('reading .zst files needs the zstandard package (pip install zstandard)') from None
        return zstandard.ZstdDecompressor().stream_reader(raw)
    return _COMPRESSED[compression](fileobj=raw)


@dataclass(frozen=True)
class _Reader:
    """Reads the records of one file format. A record is whatever is cheap to skip (a raw JSON
    line, a paragraph); `text()` turns a kept record into the document's text."""

    text_field: str
    txt_document: str

    def records(self, stream, name: str, fmt: str) -> Iterator:
        if fmt == 'json':
            yield from self._json_records(stream, name)
        elif fmt == 'text':
            yield from self._text_records(io.TextIOWrapper(stream, encoding='utf-8', errors='replace', newline=''))
        elif fmt == 'zip':
            with zipfile.ZipFile(stream) as archive:
                for member in sorted(i.filename for i in archive.infolist() if not i.is_dir()):
                    member_fmt, compression = file_format(member)
                    with archive.open(member) as m:
                        if member_fmt == 'parquet':
                            yield from self.parquet_texts(io.BytesIO(m.read()), member, 0, None)
                        else:
                            yield from self.records(_decompress(m, compression), member, member_fmt)

    def _json_records(self, stream, name):
        head = stream.read(1)
        while head.isspace():
            head = stream.read(1)
        if head == b'[':  # one JSON array rather than JSON lines
            for row in json.loads(head + stream.read()):
                yield _Row(row, name)
            return
        first = True
        for line in stream:
            if first:
                line, first = head + line, False
            if line.strip():
                yield line

    def _text_records(self, text_stream):
        if self.txt_document == 'file':
            yield text_stream.read()
        elif self.txt_document == 'line':
            for line in text_stream:
                yield line.rstrip('\r\n')
        else:  # paragraphs: runs of non-blank lines
            lines = []
            for line in text_stream:
                if line.strip():
                    lines.append(line.rstrip('\r\n'))
                elif lines:
                    yield '\n'.join(lines)
                    lines = []
            if lines:
                yield '\n'.join(lines)

    def text(self, record, name: str) -> str:
        if isinstance(record, str):
            return record
        row = record.row if isinstance(record, _Row) else json.loads(record)
        if not isinstance(row, dict) or self.text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f'data.text_field={self.text_field} is not a field of the records of {name} '
                            f'(fields: {keys}); set data.text_field to the one holding the text')
        return row[self.text_field]

    def parquet_texts(self, fobj, name: str, skip: int, take: int | None) -> Iterator[str]:
        """Texts of rows [skip, skip + take) of a parquet file; row groups outside are not read."""
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(fobj)
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f'data.text_field={self.text_field} is not a column of {name} '
                            f'(columns: {pf.schema_arrow.names}); set data.text_field to the one holding the text')
        pos = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(skip - pos, 0), n if take is None else min(n, skip + take - pos)
            pos += n
            if hi <= 0:
                break
            if lo >= n:
                continue
            column = pf.read_row_group(g, columns=[self.text_field]).column(0)
            yield from column.slice(lo, hi - lo).to_pylist()

    def parquet_rows(self, fobj) -> int:
        import pyarrow.parquet as pq
        return pq.ParquetFile(fobj).metadata.num_rows


@dataclass(frozen=True)
class _Row:
    row: object
    name: str


@dataclass
class DocumentSource:
    """The documents of one split: a FileSet, which of its documents, and how to read them.

    `select` picks documents of the stream: ('all',), ('range', a, b), ('drop_last', v) or
    ('last', v), where v is a count or None for 10% of the documents.
    In character mode (`char_chunk`), the documents are pieces of `char_chunk` characters of
    the fraction `char_range` of the joined text. `detokenizer` names the function applied to
    each text before tokenizing (see detokenizers.py). `describe()` is what the tokenized cache
    is keyed on: it changes whenever the documents could (a range is keyed as given, so a cache
    hit never needs to count documents).
    """

    files: FileSet
    text_field: str = 'text'
    txt_document: str = 'paragraph'
    select: tuple = ('all',)
    char_chunk: int | None = None
    char_range: tuple[float, float] | None = None
    detokenizer: str | None = None
    limit_setting: str | None = field(default=None, compare=False)  # the setting that chose `select`, for messages
    _count: int | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict:
        return {'files': self.files.identity(), 'text_field': self.text_field, 'txt_document': self.txt_document,
                'select': list(self.select), 'char_chunk': self.char_chunk,
                'char_range': list(self.char_range) if self.char_range else None, 'detokenizer': self.detokenizer}

    @property
    def _reader(self) -> _Reader:
        return _Reader(self.text_field, 'file' if self.char_chunk else self.txt_document)

    # -- the raw stream of documents of all files
    def _texts(self, skip: int = 0, take: int | None = None) -> Iterator[str]:
        """Texts of documents [skip, skip + take) of the files, in order."""
        pos, reader = 0, self._reader
        for path in self.files.files():
            if take is not None and pos >= skip + take:
                return
            fmt, compression = file_format(path)
            with self.files.open(path) as raw:
                if fmt == 'parquet':
                    n = reader.parquet_rows(raw)
                    if pos + n > skip:
                        yield from reader.parquet_texts(raw, path, max(skip - pos, 0),
                                                        None if take is None else skip + take - max(pos, skip))
                    pos += n
                    continue
                for record in reader.records(_decompress(raw, compression), path, fmt):
                    if take is not None and pos >= skip + take:
                        return
                    if pos >= skip:
                        yield reader.text(record, path)
                    pos += 1

    def count(self) -> int:
        """Documents in the whole stream (parquet: from the files' metadata, nothing else read)."""
        if self._count is None:
            if self.char_chunk:
                self._count = len(self._char_text_range()) // self.char_chunk
            else:
                total, reader = 0, self._reader
                for path in self.files.files():
                    fmt, compression = file_format(path)
                    with self.files.open(path) as raw:
                        if fmt == 'parquet':
                            total += reader.parquet_rows(raw)
                        else:
                            total += sum(1 for _ in reader.records(_decompress(raw, compression), path, fmt))
                self._count = total
        return self._count

    def span(self) -> tuple[int, int | None]:
        """The selected documents as [start, stop) (stop None: to the end); counts when it must."""
        kind, *args = self.select
        if kind == 'all':
            return 0, None
        if kind == 'range':
            return args[0], args[1]
        total = self.count()
        tail = args[0] if args[0] is not None else max(total // 10, 1)
        if tail >= total:
            raise DataError(f'the documents of {self.files.setting} number {total}, too few to keep {tail} '
                            f'for validation and train on the rest; add documents or set data.valid_docs '
                            f'(e.g. data.valid_docs={max(total // 10, 1)})')
        return (0, total - tail) if kind == 'drop_last' else (total - tail, total)

    def _char_text_range(self) -> str:
        text = ''.join(self._texts())
        lo, hi = self.char_range or (0.0, 1.0)
        return text[round(lo * len(text)):round(hi * len(text))]

    def __iter__(self) -> Iterator[str]:
        """The selected documents' texts, in order (nothing after the last one is read)."""
        start, stop = self.span()
        if self.char_chunk:
            text, n = self._char_text_range(), self.char_chunk
            available = len(text) // n  # the partial last piece is dropped
            for i in range(start, available if stop is None else min(stop, available)):
                yield text[i * n:(i + 1) * n]
            return
        yield from self._texts(start, None if stop is None else stop - start)
