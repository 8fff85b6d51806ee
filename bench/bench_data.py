"""Data pipeline benchmark: tokenize+pack throughput and the start time of a run with a warm cache.

Default: the OpenWebText code path on the shared 11,000-document stand-in, as a Kaggle run sees it
(OWT_SUBSET_NUM=11000, data=openwebtext-split, data.data_files=../shared/corpus/english.jsonl.gz):

  python bench/bench_data.py                       # num_proc 1 and all CPUs, model.length=1024
  python bench/bench_data.py --num-proc 1 2 4 --length 128 1024

For each setting it builds the cache from nothing (documents/s, tokens/s over both splits),
then times (a) the same request again in the process (the cache hit) and (b) a fresh Python
process doing what main.py does before its first training step: load the tokenizer, open the
cached blocks, build the loaders, fetch one batch. Prints a table; writes JSON to bench/results/.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'):
    os.environ.setdefault(var, '1')

FRESH_START = '''
import sys, time, json
start = time.time()
sys.path.insert(0, {root!r})
from hydra import compose, initialize_config_dir
import dataloader, main, settings
with initialize_config_dir(config_dir={configs!r}, version_base=None):
    config = settings.resolve(compose(config_name='config', overrides={overrides!r}))
imported = time.time()
tokenizer = dataloader.get_tokenizer(config)
tokenized = time.time()
train, valid = dataloader.get_dataloaders(config, tokenizer)
opened = time.time()
next(iter(train))
print(json.dumps({{'imports_s': imported - start, 'tokenizer_s': tokenized - imported,
                   'cache_and_loaders_s': opened - tokenized, 'first_batch_s': time.time() - opened,
                   'total_s': time.time() - start}}))
'''


def overrides_for(args, length: int, num_proc: int, cache_dir: Path) -> list[str]:
    return ['data=openwebtext-split', f'data.data_files={args.data_files}', f'data.subset_num={args.subset}',
            f'data.cache_dir={cache_dir}', f'data.num_proc={num_proc}', f'model.length={length}',
            'model=small', 'loader.batch_size=8', 'loader.global_batch_size=8', 'trainer.accelerator=cpu']


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    import settings
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return settings.resolve(hydra_compose(config_name='config', overrides=overrides))


def run(args, length: int, num_proc: int, tokenizer) -> dict:
    import dataloader
    cache_dir = Path(tempfile.mkdtemp(prefix='bench-data-', dir=args.tmp))
    try:
        tok_dir = cache_dir / 'tokenizers'
        shutil.copytree(Path(args.tokenizer_cache) / 'tokenizers', tok_dir)  # not part of the timing
        config = compose(overrides_for(args, length, num_proc, cache_dir))
        start = time.time()
        caches = dataloader.get_datasets(config, tokenizer)
        cold = time.time() - start
        start = time.time()
        dataloader.get_datasets(config, tokenizer)
        hit = time.time() - start
        script = FRESH_START.format(root=str(ROOT), configs=str(ROOT / 'configs'),
                                    overrides=overrides_for(args, length, num_proc, cache_dir))
        fresh = json.loads(subprocess.run([sys.executable, '-c', script], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1])
        docs = sum(c.meta['documents'] for c in caches.values())
        tokens = sum(c.meta['tokens'] for c in caches.values())
        return {'length': length, 'num_proc': num_proc, 'documents': docs, 'tokens': tokens,
                'train_documents': caches['train'].meta['documents'],
                'validation_documents': caches['validation'].meta['documents'],
                'blocks': {s: len(c) for s, c in caches.items()},
                'cache_bytes': sum(f.stat().st_size for c in caches.values() for f in c.path.iterdir()),
                'build_s': cold, 'documents_per_s': docs / cold, 'tokens_per_s': tokens / cold,
                'cache_hit_s': hit, 'fresh_process_start': fresh}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-files', default=str(ROOT.parent / 'shared' / 'corpus' / 'english.jsonl.gz'),
                        help='local stand-in for OpenWebText (data.data_files)')
    parser.add_argument('--subset', type=int, default=11000, help='OWT_SUBSET_NUM (documents read)')
    parser.add_argument('--length', type=int, nargs='+', default=[1024], help='model.length values')
    parser.add_argument('--num-proc', type=int, nargs='+', default=None,
                        help='data.num_proc values (default: 1 and all CPUs)')
    parser.add_argument('--tmp', default=None, help='directory for the temporary caches')
    parser.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'bench_data.json'))
    args = parser.parse_args()
    if not Path(args.data_files).exists():
        parser.error(f'--data-files {args.data_files} does not exist')
    import dataloader
    import runtime
    cpus = runtime.cpus()
    num_procs = args.num_proc or sorted({1, cpus})
    args.tokenizer_cache = tempfile.mkdtemp(prefix='bench-tok-', dir=args.tmp)
    tokenizer = dataloader.get_tokenizer(compose(['data.cache_dir=' + args.tokenizer_cache]))
    results = []
    try:
        for length in args.length:
            for num_proc in num_procs:
                results.append(run(args, length, num_proc, tokenizer))
                r = results[-1]
                print(f'  L={length} num_proc={num_proc}: {r["build_s"]:.1f} s', file=sys.stderr)
    finally:
        shutil.rmtree(args.tokenizer_cache, ignore_errors=True)
    header = (f'{"L":>5} {"proc":>4} {"train/valid docs":>16} {"tokens":>9} {"build s":>8} {"docs/s":>7} '
              f'{"tokens/s":>9} {"hit s":>6} {"fresh start s":>13}')
    print(f'data pipeline, OWT_SUBSET_NUM={args.subset} on {args.data_files} ({cpus} CPUs)')
    print(header)
    print('-' * len(header))
    for r in results:
        print(f'{r["length"]:>5} {r["num_proc"]:>4} {r["train_documents"]:>9}/{r["validation_documents"]:<6} '
              f'{r["tokens"]:>9} {r["build_s"]:>8.1f} {r["documents_per_s"]:>7.0f} {r["tokens_per_s"]:>9.0f} '
              f'{r["cache_hit_s"]:>6.3f} {r["fresh_process_start"]["total_s"]:>13.1f}')
    print('fresh start = new process: imports, tokenizer, cached blocks + loaders, first batch '
          '(the part before the model is built)')
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'machine': {'cpus': cpus, 'platform': platform.platform(),
                                           'python': platform.python_version()},
                               'data_files': args.data_files, 'subset': args.subset, 'results': results}, indent=2))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
