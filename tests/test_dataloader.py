"""dataloader.py, corpora.py, detokenizers.py (SPEC §2): document sources, OWT subsets, packing, the
tokenized cache, configs, detokenizers; the loaders: seeded shuffling, DDP sharding, worker/pinning
defaults, and exact resume through a real Lightning checkpoint (the batches after a resume are the
ones an uninterrupted run would have seen: no repeats, no skips).

Everything runs offline: hub-backed configs read local stand-ins through `data.data_files`
(the shared 11,220-document English corpus, and small parquet/jsonl/txt files made here).
Expectations are built independently: documents are re-read here with gzip/json/pyarrow,
blocks are rebuilt by hand from a separate tokenization, and detokenizer outputs are written out.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import checkpoints
import corpora
import dataloader
import detokenizers
import errors
import runtime
import settings
from conftest import ROOT, SHARED_CORPUS

CONFIGS = str(ROOT / 'configs')
needs_corpus = pytest.mark.skipif(not SHARED_CORPUS.exists(),
                                  reason=f'the shared corpus {SHARED_CORPUS} is absent (see shared/README.md)')


def make_config(*overrides, cache_dir=None):
    """The real configs/ composed with overrides, as main.py gets them (batch sizes resolved)."""
    base = ['model=micro', 'model.length=32', 'loader.global_batch_size=4', 'loader.batch_size=4',
            'loader.eval_batch_size=4', 'loader.num_workers=0', 'data.num_proc=1', 'trainer.accelerator=cpu']
    if cache_dir is not None:
        base.append(f'data.cache_dir={cache_dir}')
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return settings.resolve(compose(config_name='config', overrides=base + list(overrides)))


@pytest.fixture(scope='session')
def gpt2(tmp_path_factory):
    return dataloader.get_tokenizer(make_config(cache_dir=tmp_path_factory.mktemp('tok')))


@pytest.fixture(scope='session')
def corpus_texts():
    if not SHARED_CORPUS.exists():
        pytest.skip(f'the shared corpus {SHARED_CORPUS} is absent (see shared/README.md)')
    with gzip.open(SHARED_CORPUS, 'rt', encoding='utf-8') as f:
        return [json.loads(line)['text'] for line in f if line.strip()]


@pytest.fixture(autouse=True)
def no_subset_env(monkeypatch):
    monkeypatch.delenv('OWT_SUBSET_NUM', raising=False)


def write_jsonl(path, texts, field='text'):
    with open(path, 'w', encoding='utf-8') as f:
        for t in texts:
            f.write(json.dumps({field: t}) + '\n')
    return path


def write_parquet(path, texts, field='text', row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({field: texts, 'other': list(range(len(texts)))}), path,
                   row_group_size=row_group_size or max(len(texts), 1))
    return path


def docs_of(source):
    return list(source)


def sentences(n, seed=0):
    """n distinct short English-like documents."""
    rng = np.random.default_rng(seed)
    words = 'the cat sat on a mat while dogs ran far away into green fields of tall grass'.split()
    return [f'doc {i}: ' + ' '.join(rng.choice(words, size=rng.integers(3, 30))) + '.' for i in range(n)]


# ---- OWT subset semantics (deliverable 1) ----------------------------------------------------
def check_owt_subset(monkeypatch, tmp_path, tokenizer, texts, n, tokens=True):
    """OWT_SUBSET_NUM=n through data.data_files=<shared corpus>: the documents of each split are
    exactly the corpus' first floor(0.9 n) and the next n - floor(0.9 n), in order."""
    monkeypatch.setenv('OWT_SUBSET_NUM', str(n))
    config = make_config('data=openwebtext-split', f'data.data_files={SHARED_CORPUS}', 'data.num_proc=2',
                         cache_dir=tmp_path)
    n_train = (9 * n) // 10
    expected = {'train': texts[:n_train], 'validation': texts[n_train:n]}
    sources = dataloader.document_sources(config.data)
    for split in expected:
        assert docs_of(sources[split]) == expected[split]  # in order, disjoint
    caches = dataloader.get_datasets(config, tokenizer)
    for split, docs in expected.items():
        assert caches[split].meta['documents'] == len(docs)
        if tokens:  # an independent tokenization of exactly those documents
            n_tokens = sum(map(len, tokenizer(docs, add_special_tokens=False)['input_ids']))
            assert caches[split].meta['tokens'] == n_tokens
            assert len(caches[split]) == (n_tokens + len(docs)) // 30  # + one EOS per document, L-2 per block
    return caches


@needs_corpus
def test_owt_subset_1100_is_990_train_110_valid(monkeypatch, tmp_path, gpt2, corpus_texts):
    check_owt_subset(monkeypatch, tmp_path, gpt2, corpus_texts, 1100)


@needs_corpus
@pytest.mark.slow
def test_owt_subset_11000_is_9900_train_1100_valid(monkeypatch, tmp_path, gpt2, corpus_texts):
    caches = check_owt_subset(monkeypatch, tmp_path, gpt2, corpus_texts, 11000, tokens=False)
    assert (caches['train'].meta['documents'], caches['validation'].meta['documents']) == (9900, 1100)


def test_subset_split_counts():
    assert dataloader.subset_split(11000) == (9900, 1100)
    assert dataloader.subset_split(2) == (1, 1)
    assert dataloader.subset_split(19) == (17, 2)
    for n in range(2, 200):
        n_train, n_valid = dataloader.subset_split(n)
        assert n_train == int(0.9 * n + 1e-9) and n_valid >= 1 and n_train + n_valid == n


def test_subset_is_deterministic_and_independent_of_processes(tmp_path, gpt2):
    files = write_jsonl(tmp_path / 'c.jsonl', sentences(400))
    built = []
    for num_proc, cache in ((1, 'a'), (2, 'b')):
        config = make_config('data=openwebtext-split', f'data.data_files={files}', 'data.subset_num=300',
                             f'data.num_proc={num_proc}', cache_dir=tmp_path / cache)
        caches = dataloader.get_datasets(config, gpt2)
        built.append({s: np.array(c.blocks) for s, c in caches.items()})
        assert caches['train'].meta['documents'] == 270 and caches['validation'].meta['documents'] == 30
    for split in ('train', 'validation'):
        np.testing.assert_array_equal(built[0][split], built[1][split])


@pytest.mark.parametrize('kind', ['jsonl', 'parquet'])
def test_subset_reads_only_the_first_n_documents(tmp_path, kind):
    """Documents after the N-th are never parsed: a corrupt record (jsonl) or a corrupt file
    (parquet) placed after them does not disturb the subset."""
    texts = sentences(50)
    if kind == 'jsonl':
        path = write_jsonl(tmp_path / 'c.jsonl', texts)
        with open(path, 'a') as f:
            f.write('{this is not json\n')
        spec = str(path)
    else:
        write_parquet(tmp_path / 'part-0.parquet', texts, row_group_size=7)
        (tmp_path / 'part-1.parquet').write_bytes(b'not a parquet file at all')
        spec = str(tmp_path / 'part-*.parquet')
    config = make_config('data=openwebtext-split', f'data.data_files={spec}', 'data.subset_num=50', cache_dir=tmp_path)
    sources = dataloader.document_sources(config.data)
    assert docs_of(sources['train']) == texts[:45] and docs_of(sources['validation']) == texts[45:50]


def test_owt_without_subset_keeps_the_last_documents_for_validation(tmp_path):
    texts = sentences(120)
    write_parquet(tmp_path / 'train-00000-of-00002.parquet', texts[:70], row_group_size=9)
    write_parquet(tmp_path / 'train-00001-of-00002.parquet', texts[70:], row_group_size=9)
    config = make_config('data=openwebtext-split', f'data.data_files={tmp_path}/train-*.parquet',
                         'data.valid_docs=25', cache_dir=tmp_path / 'cache')
    sources = dataloader.document_sources(config.data)
    assert docs_of(sources['train']) == texts[:95] and docs_of(sources['validation']) == texts[95:]
    assert config.data.valid_docs == 25
    assert make_config('data=openwebtext-split').data.valid_docs == 100_000  # the documented default


def test_subset_env_and_override(monkeypatch):
    monkeypatch.setenv('OWT_SUBSET_NUM', '11000')
    assert make_config('data=openwebtext-split').data.subset_num == '11000'
    assert str(make_config('data=openwebtext-split', 'data.subset_num=500').data.subset_num) == '500'
    monkeypatch.delenv('OWT_SUBSET_NUM')
    assert make_config('data=openwebtext-split').data.subset_num is None


@pytest.mark.parametrize('value', ['abc', '1', '0', '-5', '1.5', '11000x'])
def test_bad_subset_values_name_the_variable(monkeypatch, tmp_path, value):
    monkeypatch.setenv('OWT_SUBSET_NUM', value)
    config = make_config('data=openwebtext-split', f'data.data_files={tmp_path}/x.jsonl', cache_dir=tmp_path)
    with pytest.raises(errors.DataError, match=r'^OWT_SUBSET_NUM=.* must be an integer >= 2.*OWT_SUBSET_NUM=11000$'):
        dataloader.document_sources(config.data)


def test_bad_subset_override_names_the_override(tmp_path):
    config = make_config('data=openwebtext-split', 'data.subset_num=abc', cache_dir=tmp_path)
    with pytest.raises(errors.DataError, match=r'^data\.subset_num=abc must be an integer'):
        dataloader.document_sources(config.data)


def test_subset_larger_than_the_corpus_is_an_error(monkeypatch, tmp_path, gpt2):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(30))
    monkeypatch.setenv('OWT_SUBSET_NUM', '32')  # 28 train (fits), 4 validation (only 2 exist)
    config = make_config('data=openwebtext-split', f'data.data_files={path}', cache_dir=tmp_path)
    with pytest.raises(errors.DataError, match=r'only 30 documents; use a smaller OWT_SUBSET_NUM \(at most 30\)'):
        dataloader.get_datasets(config, gpt2)


def test_carving_too_few_documents_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(5))
    config = make_config('data=local', f'data.train_files={path}', 'data.valid_docs=5', cache_dir=tmp_path)
    with pytest.raises(errors.DataError, match='too few to keep 5 for validation'):
        docs_of(dataloader.document_sources(config.data)['train'])
    with pytest.raises(errors.DataError, match='data.valid_docs=0 must be >= 1'):
        dataloader.document_sources(make_config('data=local', f'data.train_files={path}', 'data.valid_docs=0').data)


def test_local_default_validation_is_ten_percent(tmp_path):
    texts = sentences(53)
    path = write_jsonl(tmp_path / 'c.jsonl', texts)
    sources = dataloader.document_sources(make_config('data=local', f'data.train_files={path}', cache_dir=tmp_path).data)
    assert docs_of(sources['train']) == texts[:48] and docs_of(sources['validation']) == texts[48:]


# ---- local files for hub configs (deliverable 3) ---------------------------------------------
def test_file_formats_read_the_same_documents(tmp_path):
    texts = ['first document\nwith two lines', 'second one', 'third: ünïcödé €', 'fourth']
    write_jsonl(tmp_path / 'a.jsonl', texts)
    with gzip.open(tmp_path / 'b.jsonl.gz', 'wt', encoding='utf-8') as f:
        f.write(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    (tmp_path / 'c.json').write_text(json.dumps([{'text': t} for t in texts]))
    write_parquet(tmp_path / 'd.parquet', texts, row_group_size=3)
    (tmp_path / 'e.txt').write_text('\n\n'.join(texts) + '\n\n\n')
    import zipfile
    with zipfile.ZipFile(tmp_path / 'f.zip', 'w') as z:
        z.writestr('inner/x.jsonl', ''.join(json.dumps({'text': t}) + '\n' for t in texts))
    for name in ('a.jsonl', 'b.jsonl.gz', 'c.json', 'd.parquet', 'e.txt', 'f.zip'):
        files = corpora.FileSet((str(tmp_path / name),), 'data.data_files', str(tmp_path))
        assert docs_of(corpora.DocumentSource(files)) == texts, name
    lines = corpora.FileSet((str(tmp_path / 'e.txt'),), 'x', str(tmp_path))
    assert docs_of(corpora.DocumentSource(lines, txt_document='line'))[:3] == ['first document', 'with two lines', '']


def test_ranges_across_files_and_row_groups(tmp_path):
    texts = sentences(40)
    for i, (a, b) in enumerate(((0, 13), (13, 14), (14, 40))):
        write_parquet(tmp_path / f'p{i}.parquet', texts[a:b], row_group_size=4)
    files = corpora.FileSet((str(tmp_path / 'p*.parquet'),), 'x', str(tmp_path))
    for select, expected in ((('range', 0, 13), texts[:13]), (('range', 11, 27), texts[11:27]),
                             (('range', 13, 14), texts[13:14]), (('last', 7), texts[33:]),
                             (('drop_last', 7), texts[:33]), (('all',), texts), (('last', None), texts[36:])):
        assert docs_of(corpora.DocumentSource(files, select=select)) == expected, select
    assert corpora.DocumentSource(files).count() == 40


def test_split_named_local_files_feed_their_splits(tmp_path):
    """A Kaggle-style copy of a hub dataset: files named train-*/validation-*/test-*."""
    d = tmp_path / 'wikitext-2-raw-v1'
    d.mkdir()
    splits = {s: [f'{s} line {i} .' for i in range(n)] for s, n in (('train', 12), ('validation', 5), ('test', 4))}
    for s, texts in splits.items():
        write_parquet(d / f'{s}-00000-of-00001.parquet', texts)
    wiki = dataloader.document_sources(make_config('data=wikitext2', f'data.data_files={d}', cache_dir=tmp_path).data)
    assert docs_of(wiki['train']) == splits['train'] and docs_of(wiki['validation']) == splits['validation']
    assert wiki['train'].detokenizer == wiki['validation'].detokenizer == 'wikitext'
    news = dataloader.document_sources(make_config('data=ag_news', f'data.data_files={d}/*.parquet',
                                                   cache_dir=tmp_path).data)
    assert docs_of(news['validation']) == splits['test']  # ag_news validates on its test split


def test_data_files_mapping(tmp_path, gpt2):
    a = write_jsonl(tmp_path / 'a.jsonl', sentences(20))
    b = write_parquet(tmp_path / 'b.parquet', sentences(6, seed=1), field='text')
    config = make_config('data=openwebtext', f"data.data_files={{train:'{a}',validation:'{b}'}}", cache_dir=tmp_path)
    sources = dataloader.document_sources(config.data)
    assert docs_of(sources['validation']) == sentences(6, seed=1)
    assert sources['validation'].detokenizer == 'wikitext'  # read as the wikitext103 split it stands in for
    with pytest.raises(errors.DataError, match=r'data\.data_files must be'):
        dataloader.document_sources(make_config('data=openwebtext', f"data.data_files={{tran:'{a}'}}").data)


def test_data_files_may_name_validation_files_only_for_evaluation(tmp_path):
    v = write_jsonl(tmp_path / 'v.jsonl', sentences(5), field='sentence')  # ptb's field
    config = make_config('data=ptb', f"data.data_files={{validation:'{v}'}}", cache_dir=tmp_path)
    assert docs_of(dataloader.document_sources(config.data, ('validation',))['validation']) == sentences(5)
    with pytest.raises(errors.DataError, match=r'^data\.data_files names validation files only: training'):
        dataloader.document_sources(config.data)


def test_eval_datasets_build_each_set_like_data_equals_name(tmp_path):
    """eval.datasets: each set's own config (detokenizer, EOS setting) over the shared defaults, the
    command line's data.* keys for every set, an entry's keys above them, the model's tokenizer."""
    config = make_config('data=openwebtext-split', 'data.tokenizer_name_or_path=text8', 'data.wrap=false',
                         "eval.datasets=[ptb,{name:lm1b,wrap:true,valid_docs:7},wikitext2]", cache_dir=tmp_path)
    # the tokenizer as configure_from sets it from a checkpoint (not on the command line)
    sets = dataloader.eval_data_configs(config, explicit={'data.wrap', 'data'})
    assert list(sets) == ['ptb', 'lm1b', 'wikitext2']
    ptb, lm1b, wiki = sets.values()
    assert (ptb.detokenizer, ptb.text_field, ptb.insert_valid_eos, ptb.wrap) == ('ptb', 'sentence', False, False)
    assert (lm1b.wrap, lm1b.valid_docs, lm1b.valid_split) == (True, 7, 'test')   # the entry wins
    assert {s.tokenizer_name_or_path for s in sets.values()} == {'text8'}      # lm1b.yaml says BERT
    assert wiki.cache_dir == str(tmp_path) and wiki.hub_path == 'Salesforce/wikitext'
    for entries, message in (('[ptb,ptb]', 'eval.datasets names ptb twice'),
                             ('[{name:ptb,files:x}]', r'eval.datasets: files \(in the entry of ptb\) is not a data'),
                             ('[{wrap:true}]', 'eval.datasets: None is not a data config'),
                             ('[]', r'eval.datasets=\[\] must be a non-empty list')):
        with pytest.raises(errors.DataError, match=message):
            dataloader.eval_data_configs(make_config(f'eval.datasets={entries}'))


def test_missing_files_and_fields_are_one_line_errors(tmp_path):
    with pytest.raises(errors.DataError, match=r'data\.data_files=.*matches no files'):
        docs_of(dataloader.document_sources(make_config('data=openwebtext-split', f'data.data_files={tmp_path}/none*.jsonl',
                                                        cache_dir=tmp_path).data)['train'])
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(4), field='body')
    sources = dataloader.document_sources(make_config('data=local', f'data.train_files={path}', cache_dir=tmp_path).data)
    with pytest.raises(errors.DataError, match=r"data\.text_field=text is not a field .*\['body'\]"):
        docs_of(sources['train'])
    bad = tmp_path / 'c.csv'
    bad.write_text('a,b\n')
    with pytest.raises(errors.DataError, match=r'use \.parquet, \.jsonl'):
        docs_of(corpora.DocumentSource(corpora.FileSet((str(bad),), 'x', str(tmp_path))))


def test_hub_unreachable_is_one_clear_line(tmp_path, gpt2):
    assert os.environ.get('HF_HUB_OFFLINE') == '1'  # conftest: hub calls fail fast
    config = make_config('data=openwebtext-split', 'data.subset_num=100', cache_dir=tmp_path)
    with pytest.raises(errors.DataError) as err:
        dataloader.get_datasets(config, gpt2)
    message = str(err.value)
    assert '\n' not in message and 'Skylion007/openwebtext' in message
    assert 'data.data_files' in message and 'data=local' in message


def test_hub_configs_name_parquet_files():
    """Without the network: each hub-backed config points at the repository's parquet files."""
    expected = {
        'openwebtext-split': ('hf://datasets/Skylion007/openwebtext/plain_text/train-*.parquet', None),
        'wikitext103': ('hf://datasets/Salesforce/wikitext/wikitext-103-raw-v1/train-*.parquet',
                        'hf://datasets/Salesforce/wikitext/wikitext-103-raw-v1/validation-*.parquet'),
        'ptb': ('hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/train/*.parquet',
                'hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/validation/*.parquet'),
        'ag_news': ('hf://datasets/fancyzhx/ag_news/data/train-*.parquet',
                    'hf://datasets/fancyzhx/ag_news/data/test-*.parquet'),
        'lm1b': ('hf://datasets/billion-word-benchmark/lm1b@refs%2Fconvert%2Fparquet/plain_text/*train/*.parquet',
                 'hf://datasets/billion-word-benchmark/lm1b@refs%2Fconvert%2Fparquet/plain_text/test/*.parquet'),
    }
    for name, (train, valid) in expected.items():
        sources = dataloader.document_sources(make_config(f'data={name}').data)
        assert sources['train'].files.items == (train,), name
        assert sources['validation'].files.items == ((valid,) if valid else (train,)), name
    owt = dataloader.document_sources(make_config('data=openwebtext').data)
    assert owt['validation'].files.items == expected['wikitext103'][1:]
    assert owt['validation'].detokenizer == 'wikitext'
    fineweb = dataloader.document_sources(make_config('data=fineweb-edu').data)
    assert fineweb['train'].files.items == ('hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet',)
    assert fineweb['validation'].files.items == expected['openwebtext-split'][:1]
    assert fineweb['validation'].select == ('last', 100_000)


# ---- every config loads (deliverable 5) -----------------------------------------------------
@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory):
    """A WordPiece tokenizer standing in for bert-base-uncased (same special tokens and layout)."""
    import transformers
    text = ' '.join(sentences(300)).replace('.', ' . ').replace(':', ' : ')
    words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + sorted(set(text.split()) | set('0123456789'))
    path = tmp_path_factory.mktemp('bert')
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    return path


@pytest.fixture(scope='session')
def stdlib_cache(tmp_path_factory):
    return tmp_path_factory.mktemp('stdlib')


CONFIG_FIELDS = {'ptb': 'sentence', 'scientific_papers_arxiv': 'article', 'scientific_papers_pubmed': 'article'}


@pytest.mark.parametrize('name', sorted(p.stem for p in (ROOT / 'configs' / 'data').glob('*.yaml')))
def test_every_data_config_builds_loaders(name, tmp_path, gpt2, tiny_bert, stdlib_cache):
    import torch
    texts = sentences(300)
    field = CONFIG_FIELDS.get(name, 'text')
    overrides = [f'data={name}']
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    if name.startswith('text8'):
        (tmp_path / 'text8').write_text(' '.join(t.lower().replace('.', '').replace(':', '') for t in texts))
        overrides.append(f'data.data_files={tmp_path}/text8')
    elif name == 'stdlib':  # the extracted docstrings are shared by the session
        overrides.append(f'data.cache_dir={stdlib_cache}')
    elif name == 'local':
        overrides.append(f'data.train_files={write_jsonl(tmp_path / "c.jsonl", texts)}')
    else:
        write_parquet(data_dir / 'train-00000-of-00001.parquet', texts[:250], field=field)
        write_parquet(data_dir / 'validation-00000-of-00001.parquet', texts[250:], field=field)
        write_parquet(data_dir / 'test-00000-of-00001.parquet', texts[250:], field=field)
        overrides.append(f'data.data_files={data_dir}')
    if 'lm1b' in name:
        overrides.append(f'data.tokenizer_name_or_path={tiny_bert}')
    config = make_config(f'data.cache_dir={tmp_path / "cache"}', *overrides)
    tokenizer = gpt2 if config.data.tokenizer_name_or_path == 'gpt2' else dataloader.get_tokenizer(config)
    train, valid = dataloader.get_dataloaders(config, tokenizer)
    batch = next(iter(train))
    assert batch['input_ids'].shape == (4, 32) and batch['input_ids'].dtype == torch.int64
    vocab, _ = dataloader.model_vocab(tokenizer)
    assert int(batch['input_ids'].max()) < vocab
    first = next(iter(valid))['input_ids']
    assert (first[:, 0] == tokenizer.bos_token_id).all()
    if not config.data.wrap:
        assert (next(iter(valid))['attention_mask'] == 0).any()  # short sentences are padded


def test_zero_shot_configs_use_detokenizers_and_no_eos():
    for name, detok in (('wikitext2', 'wikitext'), ('wikitext103', 'wikitext'), ('ptb', 'ptb'), ('lm1b', 'lm1b'),
                        ('lambada', 'lambada'), ('ag_news', None), ('scientific_papers_arxiv', 'scientific_papers'),
                        ('scientific_papers_pubmed', 'scientific_papers')):
        data = make_config(f'data={name}').data
        assert data.detokenizer == detok and data.insert_valid_eos is False, name
    assert make_config('data=openwebtext-split').data.insert_valid_eos is True
    lm1b = make_config('data=lm1b').data
    assert lm1b.wrap is False and lm1b.tokenizer_name_or_path == 'bert-base-uncased'
    assert make_config('data=lm1b-wrap').data.wrap is True


def test_default_cache_dir_is_inside_the_project():
    config = make_config('data=openwebtext-split')
    assert dataloader.resolve_cache_dir(config.data) == ROOT / 'data_cache'


# ---- text8 (deliverable 5) ------------------------------------------------------------------
def test_text8_tokenizer_has_upstream_ids():
    tok = dataloader.Text8Tokenizer()
    assert len(tok) == 35 and dataloader.model_vocab(tok) == (35, 4)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 3, 5, 7)
    assert tok.encode('az Z') == [8, 33, 34, 33]
    assert tok.encode('a1é!b  C') == [8, 34, 9, 34, 10]  # text8's normalisation: other runs -> one space
    ids, lengths = tok.encode_arrays(['ab', '', 'c d'])
    assert ids.tolist() == [8, 9, 10, 34, 11] and lengths.tolist() == [2, 0, 3]
    assert tok.decode([2, 8, 34, 9, 3]) == '[BOS]a b[EOS]'
    assert tok.decode([2, 8, 34, 9, 3], skip_special_tokens=True) == 'a b'


def test_text8_splits_characters_like_upstream(tmp_path):
    rng = np.random.default_rng(0)
    text = ''.join(rng.choice(list('abcdefghij '), size=1000))
    (tmp_path / 'text8').write_text(text)
    config = make_config('data=text8', f'data.data_files={tmp_path}/text8', 'model.length=10', cache_dir=tmp_path)
    sources = dataloader.document_sources(config.data)
    assert docs_of(sources['train']) == [text[i:i + 10] for i in range(0, 900, 10)]
    assert docs_of(sources['validation']) == [text[i:i + 10] for i in range(950, 1000, 10)]
    crop = dataloader.document_sources(make_config('data=text8-crop', f'data.data_files={tmp_path}/text8',
                                                   'model.length=10', cache_dir=tmp_path).data)
    assert docs_of(crop['train']) == [text[i:i + 20] for i in range(0, 900, 20)]  # blocks twice as long
    import zipfile
    with zipfile.ZipFile(tmp_path / 'text8.zip', 'w') as z:
        z.writestr('text8', text)
    zipped = make_config('data=text8', f'data.data_files={tmp_path}/text8.zip', 'model.length=10', cache_dir=tmp_path)
    assert docs_of(dataloader.document_sources(zipped.data)['validation']) == docs_of(sources['validation'])


def test_text8_crop_windows(tmp_path):
    tok = dataloader.Text8Tokenizer()
    rng = np.random.default_rng(1)
    (tmp_path / 'text8').write_text(''.join(rng.choice(list('abcdefghijklmnop '), size=20000)))
    config = make_config('data=text8-crop', f'data.data_files={tmp_path}/text8', 'model.length=16', cache_dir=tmp_path)
    train, _ = dataloader.get_dataloaders(config, tok)
    dataset, sampler = train.dataset, train.batch_sampler
    assert dataset.cache.blocks.shape[1] == 32
    batch_indices = next(iter(sampler))
    first = dataset.__getitems__(batch_indices)['input_ids']
    assert first.shape == (4, 16)
    np.testing.assert_array_equal(first.numpy(), dataset.__getitems__(batch_indices)['input_ids'].numpy())
    offsets = set()
    for v in range(200):
        window = dataset.__getitems__([v])['input_ids'][0].numpy()
        row = dataset.cache.blocks[v % len(dataset)].astype(np.int64)
        matches = [o for o in range(17) if (row[o:o + 16] == window).all()]
        assert matches
        offsets.update(matches)
    assert len(offsets) > 10  # windows start all over the block


# ---- packing (wrap / pad semantics, SPEC §2) ------------------------------------------------
B, E, P = 100, 101, 102


def test_wrap_packer_by_hand():
    packer = dataloader.WrapPacker(length=5, bos=B, eos=E, insert_eos=True)
    blocks, none = packer.add(np.array([1, 2, 3, 4, 5]), np.array([3, 2]))  # stream 1 2 3 E 4 5 E
    assert none is None
    assert blocks.tolist() == [[B, 1, 2, 3, E], [B, E, 4, 5, E]]
    blocks, _ = packer.add(np.array([6, 7, 8, 9]), np.array([4]))  # carried: E, then 6 7 8 9 E
    assert blocks.tolist() == [[B, E, 6, 7, E], [B, 8, 9, E, E]]
    blocks, _ = packer.add(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert blocks.shape == (0, 5)
    plain = dataloader.WrapPacker(length=4, bos=B, eos=E, insert_eos=False)
    assert plain.add(np.array([1, 2, 3, 4, 5]), np.array([3, 2]))[0].tolist() == [[B, 1, 2, E], [B, 3, 4, E]]


def test_pad_packer_by_hand():
    packer = dataloader.PadPacker(length=5, bos=B, eos=E, pad=P)
    rows, lengths = packer.add(np.array([1, 2, 3, 4, 5, 6, 7]), np.array([5, 1, 0, 1]))
    assert rows.tolist() == [[B, 1, 2, 3, E], [B, 6, E, P, P], [B, E, P, P, P], [B, 7, E, P, P]]
    assert lengths.tolist() == [5, 3, 2, 3]


def test_wrapped_cache_against_independent_packing(tmp_path, gpt2):
    texts = sentences(60)
    path = write_jsonl(tmp_path / 'c.jsonl', texts)
    for insert_eos in (True, False):
        config = make_config('data=local', f'data.train_files={path}', 'data.valid_docs=10', 'model.length=16',
                             f'data.insert_train_eos={insert_eos}', cache_dir=tmp_path)
        train = dataloader.get_datasets(config, gpt2)['train']
        stream = []
        for t in texts[:50]:
            stream += gpt2.encode(t) + ([50256] if insert_eos else [])
        n = len(stream) // 14
        expected = [[50256] + stream[i * 14:(i + 1) * 14] + [50256] for i in range(n)]
        assert train.blocks.dtype == np.uint16
        assert train.blocks.tolist() == expected


def test_unwrapped_rows_pad_and_mask(tmp_path, tiny_bert):
    texts = ['the cat sat .', 'a dog ran far away into green fields of tall grass while the cat sat on a mat .', 'dogs']
    (tmp_path / 'data').mkdir()
    write_parquet(tmp_path / 'data' / 'train-0.parquet', texts)
    write_parquet(tmp_path / 'data' / 'test-0.parquet', texts)
    config = make_config('data=lm1b', f'data.data_files={tmp_path}/data', f'data.tokenizer_name_or_path={tiny_bert}',
                         'model.length=8', cache_dir=tmp_path / 'cache')
    tok = dataloader.get_tokenizer(config)
    _, valid = dataloader.get_dataloaders(config, tok)
    batch = next(iter(valid))
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    for row, mask, text in zip(batch['input_ids'].tolist(), batch['attention_mask'].tolist(), texts):
        ids = tok(detokenizers.lm1b(text), add_special_tokens=False)['input_ids'][:6]
        expected = [cls] + ids + [sep]
        assert row == expected + [pad] * (8 - len(expected))
        assert mask == [1] * len(expected) + [0] * (8 - len(expected))


# ---- the cache (deliverable 4) --------------------------------------------------------------
def count_builds(monkeypatch):
    calls = []
    original = dataloader.build_blocks

    def counting(*args, **kwargs):
        calls.append(kwargs.get('desc'))
        return original(*args, **kwargs)
    monkeypatch.setattr(dataloader, 'build_blocks', counting)
    return calls


def test_cache_hit_and_invalidation(monkeypatch, tmp_path, gpt2):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(80))
    base = ['data=openwebtext-split', f'data.data_files={path}', 'data.subset_num=60']
    calls = count_builds(monkeypatch)
    first = dataloader.get_datasets(make_config(*base, cache_dir=tmp_path / 'cache'), gpt2)
    assert calls == ['train', 'validation']
    again = dataloader.get_datasets(make_config(*base, cache_dir=tmp_path / 'cache'), gpt2)
    assert calls == ['train', 'validation']  # nothing rebuilt
    assert again['train'].path == first['train'].path
    np.testing.assert_array_equal(np.array(again['train'].blocks), np.array(first['train'].blocks))
    changes = [['model.length=64'], ['data.subset_num=70'], ['data.insert_train_eos=false'],
               ['data.detokenizer=wikitext'], ['data.text_field=other'], ['data.txt_document=line']]
    seen = {first['train'].path}
    for change in changes:
        if change == ['data.text_field=other']:  # a different column must change the key even before reading
            config = make_config(*base, *change, cache_dir=tmp_path / 'cache')
            key = dataloader.document_sources(config.data)['train'].describe()
            assert key != dataloader.document_sources(make_config(*base).data)['train'].describe()
            continue
        caches = dataloader.get_datasets(make_config(*base, *change, cache_dir=tmp_path / 'cache'), gpt2)
        assert caches['train'].path not in seen, change
        seen.add(caches['train'].path)
    n = len(calls)
    time.sleep(0.01)
    write_jsonl(path, sentences(80, seed=5))  # same file name, new contents
    dataloader.get_datasets(make_config(*base, cache_dir=tmp_path / 'cache'), gpt2)
    assert len(calls) == n + 2
    text8 = dataloader.Text8Tokenizer()
    assert dataloader.tokenizer_fingerprint(text8) != dataloader.tokenizer_fingerprint(gpt2)


def test_cache_settings_reach_the_key(tmp_path, gpt2):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(30))
    source = dataloader.document_sources(make_config('data=local', f'data.train_files={path}').data)['train']
    data = make_config('data=local', cache_dir=tmp_path).data
    a = dataloader.cached_blocks(source, gpt2, 50258, data, 16, True, True, 'train')
    b = dataloader.cached_blocks(source, gpt2, 50258, data, 16, False, True, 'train')  # no wrap
    c = dataloader.cached_blocks(source, gpt2, 50258, data, 16, True, True, 'validation')
    assert len({a.path, b.path, c.path}) == 3 and b.lengths is not None and a.lengths is None


def test_interrupted_build_leaves_nothing_trusted(monkeypatch, tmp_path, gpt2):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(40))
    config = make_config('data=local', f'data.train_files={path}', cache_dir=tmp_path / 'cache')
    original = dataloader.WrapPacker.add

    def interrupted(self, *args):
        original(self, *args)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(dataloader.WrapPacker, 'add', interrupted)
        with pytest.raises(KeyboardInterrupt):
            dataloader.get_datasets(config, gpt2)
    assert not [p for p in (tmp_path / 'cache').iterdir() if p.is_dir() and not p.name.startswith('.')]
    assert not list((tmp_path / 'cache').glob('.*.tmp'))
    assert dataloader.get_datasets(config, gpt2)['train'].meta['documents'] == 36


def test_killed_build_is_rebuilt(tmp_path, gpt2):
    """SIGKILL mid-build (no cleanup runs): the half-written directory is never trusted."""
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(200))
    cache = tmp_path / 'cache'
    script = textwrap.dedent(f'''
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import corpora, dataloader
        from omegaconf import OmegaConf
        original = corpora.DocumentSource._texts
        def slow(self, *a, **k):
            for i, t in enumerate(original(self, *a, **k)):
                if i == 100:
                    print('building', flush=True)
                    time.sleep(60)
                yield t
        corpora.DocumentSource._texts = slow
        data = OmegaConf.create({{'name': 'local', 'cache_dir': {str(cache)!r}, 'num_proc': 1,
                                  'tokenizer_name_or_path': 'gpt2'}})
        tok = dataloader.get_tokenizer(OmegaConf.create({{'data': data}}))
        files = corpora.FileSet(({str(path)!r},), 'x', {str(cache)!r})
        dataloader.cached_blocks(corpora.DocumentSource(files), tok, 50258, data, 16, True, True, 'train')
    ''')
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'building'
        assert list(cache.glob('.local-train-*.tmp'))  # a half-written build exists
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    files = corpora.FileSet((str(path),), 'x', str(cache))
    data = make_config('data=local', cache_dir=cache).data
    built = dataloader.cached_blocks(corpora.DocumentSource(files), gpt2, 50258, data, 16, True, True, 'train')
    assert built.meta['documents'] == 200
    assert not list(cache.glob('.local-train-*.tmp'))  # the stale build was removed
    assert built.path.name.startswith('local-train-L16-')


def _zero_64_kib(path):
    with open(path / 'blocks.bin', 'r+b') as f:
        f.seek(1024)
        f.write(bytes(64 * 1024))


def _large_ids(path):
    blocks = np.fromfile(path / 'blocks.bin', dtype=np.uint16)
    blocks[5:9] = 65535
    blocks.tofile(path / 'blocks.bin')


def _cut_in_half(path):
    data = (path / 'blocks.bin').read_bytes()
    (path / 'blocks.bin').write_bytes(data[:len(data) // 2])


def _broken_meta(path):
    (path / 'meta.json').write_text('{"blocks": 12, "length":')


@pytest.mark.parametrize('damage', [_zero_64_kib, _large_ids, _cut_in_half, _broken_meta])
def test_a_damaged_cache_is_named_rebuilt_and_used_only_after(damage, monkeypatch, tmp_path, gpt2, caplog):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(400))
    config = make_config('data=openwebtext-split', f'data.data_files={path}', 'data.subset_num=300',
                         cache_dir=tmp_path / 'cache')
    calls = count_builds(monkeypatch)
    first = dataloader.get_datasets(config, gpt2)['train']
    expected = np.array(first.blocks)
    del first
    damage(dataloader.get_datasets(config, gpt2)['train'].path)
    with caplog.at_level('WARNING', logger='dataloader'):
        again = dataloader.get_datasets(config, gpt2)['train']
    assert calls.count('train') == 2  # rebuilt once, from the documents
    assert f'The tokenized cache {again.path} is damaged' in caplog.text and 'rebuilding it' in caplog.text
    np.testing.assert_array_equal(np.array(again.blocks), expected)
    assert not list((tmp_path / 'cache').glob('.*.tmp'))


def test_a_cache_with_ids_beyond_the_model_is_never_used(tmp_path, gpt2):
    """A valid cache (its checksum intact) whose ids the model cannot predict (e.g. tokenized with
    another tokenizer's vocabulary): opening it with K checks every id."""
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(50))
    source = dataloader.document_sources(make_config('data=local', f'data.train_files={path}').data)['train']
    data = make_config('data=local', cache_dir=tmp_path).data
    cache = dataloader.cached_blocks(source, gpt2, 50258, data, 16, True, True, 'train')
    top = int(np.array(cache.blocks).max())
    dataloader.BlockCache(cache.path, top + 1)
    with pytest.raises(dataloader.CacheDamaged, match=f'holds the id {top}, but the model has {top} classes'):
        dataloader.BlockCache(cache.path, top)


def test_stale_builds_are_removed_unless_running(tmp_path):
    root = tmp_path
    (root / '.a-train-L8-k1.abc123.tmp').mkdir()
    (root / '.b-train-L8-k2.def456.tmp').mkdir()
    with dataloader._exclusive(root / '.b-train-L8-k2.lock'):  # b is being built right now
        dataloader._remove_stale_builds(root)
    assert [p.name for p in root.glob('.*.tmp')] == ['.b-train-L8-k2.def456.tmp']


def test_token_dtype():
    assert dataloader.token_dtype(50258) == np.uint16 and dataloader.token_dtype(65536) == np.uint16
    assert dataloader.token_dtype(65537) == np.int32


def test_too_little_data_for_one_block(tmp_path, gpt2):
    path = write_jsonl(tmp_path / 'c.jsonl', ['tiny'] * 10)
    config = make_config('data=local', f'data.train_files={path}', 'model.length=128', cache_dir=tmp_path)
    with pytest.raises(errors.DataError, match='too few for one block of model.length=128'):
        dataloader.get_datasets(config, gpt2)


def test_eval_mode_builds_only_validation(monkeypatch, tmp_path, gpt2):
    path = write_jsonl(tmp_path / 'c.jsonl', sentences(50))
    calls = count_builds(monkeypatch)
    config = make_config('mode=ppl_eval', 'data=local', f'data.train_files={path}', cache_dir=tmp_path)
    train, valid = dataloader.get_dataloaders(config, gpt2)
    assert train is None and calls == ['validation'] and len(valid) > 0


# ---- detokenizers (deliverable 5) -----------------------------------------------------------
def test_wikitext_detokenizer():
    raw = (' = = Early life = = \n The 1 @,@ 000 @-@ year @-@ old town ( founded 1850 ) is 3 @.@ 5 km wide ; '
           'its mayor \'s " new " plan , they said : fine ! Really ? Yes . It was 20 \u00b0 C . \n')
    assert detokenizers.wikitext(raw) == (
        ' == Early life ==\nThe 1,000-year-old town (founded 1850) is 3.5 km wide; '
        'its mayor\'s "new" plan, they said: fine! Really? Yes. It was 20\u00b0C.\n')
    assert detokenizers.wikitext("the players ' union") == "the players' union"


def test_ptb_detokenizer():
    assert detokenizers.ptb("the company 's N N N shares do n't trade at $ N \\/ # N <unk>") == \
        "the company's 1 1 1 shares don't trade at $1 / #1 ?"
    assert detokenizers.ptb("the firms ' profits") == "the firms' profits"


def test_lm1b_detokenizer():
    assert detokenizers.lm1b('He said : " I do n\'t know , see http : / / x.org " ( maybe ) .') == \
        'He said: "I do n\'t know, see http://x.org" (maybe) .'  # only a word's full stop is attached
    assert detokenizers.lm1b("It 's $ 5 or \u00a3 3 ; why ?") == "It's $5 or \u00a33; why?"
    assert detokenizers.lm1b('Stop ! Go now .') == 'Stop! Go now.'


def test_lambada_and_scientific_papers_detokenizers():
    assert detokenizers.lambada('  \u201cHello,\u201d she said.  ') == '\n"Hello," she said.'
    assert detokenizers.scientific_papers('we use @xmath0 @-@ fold ( see fig . 1 ) .') == \
        'we use @xmath0-fold (see fig. 1) .'
    assert detokenizers.get(None) is None
    with pytest.raises(ValueError, match=r'^data\.detokenizer=nope is unknown'):
        detokenizers.get('nope')


# ---- loaders (synthetic blocks: row i holds the id i everywhere, so a batch names its rows) ----
def make_cache(path, n, length=6):
    """A BlockCache whose row i is [i] * length (uint16), written as the cache writes it."""
    path.mkdir(parents=True, exist_ok=True)
    blocks = np.repeat(np.arange(n, dtype=np.uint16)[:, None], length, axis=1)
    blocks.tofile(path / 'blocks.bin')
    (path / 'meta.json').write_text(json.dumps({'format': dataloader.CACHE_VERSION, 'blocks': n, 'length': length,
                                                'dtype': 'uint16', 'padded': False, 'documents': n,
                                                'tokens': n * length, 'crc32': zlib.crc32(blocks)}))
    return dataloader.BlockCache(path)


def loader_config(num_workers=0, pin_memory=None, accelerator='cpu', devices=1):
    return OmegaConf.create({'loader': {'num_workers': num_workers, 'pin_memory': pin_memory},
                             'trainer': {'accelerator': accelerator, 'devices': devices}})


def rows(batch_indices, n):
    return [i % n for i in batch_indices]


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


# ---- shuffling and sharding -----------------------------------------------------------------
def test_train_batches_are_seeded_permutations():
    n, bs = 50, 5
    epoch = take(iter(dataloader.TrainBatchSampler(n, bs, seed=3)), 10)
    assert sorted(i for b in epoch for i in rows(b, n)) == list(range(n))  # one epoch: every block once
    assert epoch == take(iter(dataloader.TrainBatchSampler(n, bs, seed=3)), 10)
    assert epoch != take(iter(dataloader.TrainBatchSampler(n, bs, seed=4)), 10)
    two = take(iter(dataloader.TrainBatchSampler(n, bs, seed=3)), 20)
    assert [rows(b, n) for b in two[10:]] != [rows(b, n) for b in epoch]  # a new order each epoch
    assert all(i // n == 1 for b in two[10:] for i in b)  # sample numbers count epochs


def test_start_continues_the_stream():
    full = take(iter(dataloader.TrainBatchSampler(37, 4, seed=1)), 30)  # 9 batches per epoch
    for start in (0, 1, 8, 9, 10, 23):
        sampler = dataloader.TrainBatchSampler(37, 4, seed=1)
        sampler.start = start
        assert take(iter(sampler), 30 - start) == full[start:]


@pytest.mark.parametrize('world', [2, 3])
def test_ddp_shards_are_disjoint(monkeypatch, world):
    n, bs = 41, 3
    per_rank = n // world
    train, evals = [], []
    for rank in range(world):
        monkeypatch.setattr(runtime, 'rank_world', lambda r=rank: (r, world))
        batches = take(iter(dataloader.TrainBatchSampler(n, bs, seed=0)), per_rank // bs)
        train.append([i for b in batches for i in rows(b, n)])
        evals.append([i for b in dataloader.EvalBatchSampler(n, 4) for i in b])
        assert len(dataloader.EvalBatchSampler(n, 4)) == len(list(dataloader.EvalBatchSampler(n, 4)))
    flat = [i for r in train for i in r]
    assert len(flat) == len(set(flat)) == world * (per_rank // bs) * bs  # no block on two ranks
    assert sum(evals, []) == list(range(n))  # validation: every block exactly once over the ranks


def test_too_few_blocks_for_a_batch():
    with pytest.raises(errors.DataError, match='fewer than loader.batch_size=8'):
        next(iter(dataloader.TrainBatchSampler(5, 8, seed=0)))


# ---- pinned memory ------------------------------------------------------------------------
def test_pin_memory_only_on_gpu(tmp_path):
    dataset = dataloader.BlockDataset(make_cache(tmp_path / 'c', 8))
    sampler = dataloader.EvalBatchSampler(8, 4)
    assert not dataloader._loader(dataset, sampler, loader_config(pin_memory=True)).pin_memory
    assert not dataloader._loader(dataset, sampler, loader_config()).pin_memory
    assert dataloader._loader(dataset, sampler, loader_config(accelerator='gpu')).pin_memory
    assert not dataloader._loader(dataset, sampler, loader_config(pin_memory=False, accelerator='gpu')).pin_memory


def test_batches_are_int64_with_masks(tmp_path):
    dataset = dataloader.BlockDataset(make_cache(tmp_path / 'c', 10))
    batch = dataset.__getitems__([7, 2, 19, 2])  # unsorted, repeated, a second-epoch sample number
    assert batch['input_ids'].dtype == torch.int64 and batch['input_ids'][:, 0].tolist() == [7, 2, 9, 2]
    assert batch['attention_mask'].dtype == torch.int64 and bool((batch['attention_mask'] == 1).all())


# ---- resume through a Lightning checkpoint --------------------------------------------------
class Recorder(L.LightningModule):
    """Counts micro-batches like diffusion.Diffusion (`micro_step`, saved in the checkpoint) and
    records which blocks each one held."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.micro_step, self.seen = 0, []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch['input_ids'][:, 0].tolist())
        self.micro_step += 1
        return (self.weight * batch['input_ids'].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):
        checkpoint['micro_step'] = self.micro_step

    def on_load_checkpoint(self, checkpoint):
        self.micro_step = checkpoint['micro_step']


def fit(cache, steps, num_workers, ckpt_path=None, save_to=None):
    loader = dataloader._loader(dataloader.BlockDataset(cache), dataloader.TrainBatchSampler(len(cache), 4, seed=7),
                                loader_config(num_workers=num_workers))
    if ckpt_path is not None:  # as main.py does
        loader.batch_sampler.start = checkpoints.read_progress(ckpt_path)[1]
    model = Recorder()
    trainer = L.Trainer(accelerator='cpu', devices=1, max_steps=steps, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model.seen


@pytest.mark.parametrize('num_workers', [0, 1])
def test_resume_continues_with_the_unseen_batches(tmp_path, num_workers):
    cache = make_cache(tmp_path / 'c', 30)  # 7 batches of 4 per epoch: the run crosses epochs
    uninterrupted = fit(cache, 9, num_workers)
    assert len(uninterrupted) == 18
    first = fit(cache, 4, num_workers, save_to=tmp_path / 'last.ckpt')
    assert checkpoints.read_progress(tmp_path / "last.ckpt")[1] == 8
    second = fit(cache, 9, num_workers, ckpt_path=tmp_path / 'last.ckpt')
    assert first + second == uninterrupted  # no repeats, no skips
