"""Conditional generation at CPU scale (SPEC-2 §15): prompts, an infilling template and
semi-autoregressive samples from the character models of bench/duo_small_scale.py.

The models (AR, DUO-base, MDLM: shared English corpus read as characters, K = 35, DiT d=96 x 3
blocks, L = 64, 1000 steps) are reused from the work directory when duo_small_scale.py or
psi_small_scale.py trained them there, else trained with the same commands. Then, through
`python main.py mode=sample_eval`:
  1. prompts: sampling.prompts_file holding the first 16 characters of 64 validation blocks, one
     continuation each (AR, MDLM, DUO-base);
  2. infilling: sampling.prompt with one template, `<text> [GAP:24] <text>`, 64 samples (MDLM,
     DUO-base; AR cannot infill);
  3. semi-autoregressive: sampling.semi_ar=true, stride 32, 4 strides: 64 + 4 x 32 = 192 = 3 L tokens;
  4. unconditional samples of each model (the reference: what conditioning should not change).
It prints the letter statistics of the generated characters (continuations, gap fills, whole
unconditional samples) beside the corpus' (all validation blocks), their total variation distance,
and the distance that as many corpus characters, in runs as long as the generated texts, have (the
sampling noise: its mean and 95th percentile; gap fills are compared with the corpus' runs of as
many characters between two spaces, as the template's gap is), the generative perplexity under the AR judge (of the continuations given their
prompts; the corpus row: the validation blocks' own continuations of the same prompts), and the
semi-AR lengths.

    python bench/conditional_small_scale.py                  # ~4 min with trained models (2 CPU cores)
    python bench/conditional_small_scale.py --steps 60 --samples 16 --sampling-steps 16   # smoke run
Writes bench/results/conditional_small_scale.json; runs live in --work-dir.
"""
import argparse
import collections
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

from duo_small_scale import CORPUS, common_overrides, open_work_dir, training_overrides  # noqa: E402
from psi_small_scale import trained  # noqa: E402

MODELS = ('ar', 'mdlm', 'duo_base')
LETTERS = 'abcdefghijklmnopqrstuvwxyz '
PROMPT_CHARS = 16
GAP_CHARS = 24
TEMPLATE = f'in the early years of the [GAP:{GAP_CHARS}] and the'  # the gap lies between two spaces


def validation_blocks(work: Path) -> tuple[list[list[int]], object]:
    """(the validation blocks (token ids) of the small-scale data, its tokenizer)."""
    from hydra import compose, initialize_config_dir
    import dataloader
    import settings
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        config = compose(config_name='config', overrides=['mode=ppl_eval', 'algo=ar', 'trainer.accelerator=cpu',
                                                          *common_overrides(work)])
    config = settings.resolve(config)
    tokenizer = dataloader.get_tokenizer(config)
    blocks = []
    for batch in dataloader.get_dataloaders(config, tokenizer)[1]:
        blocks.extend(batch['input_ids'].tolist())
    return blocks, tokenizer


def letter_counts(texts) -> collections.Counter:
    return collections.Counter(c for text in texts for c in text if c in LETTERS)


def frequencies(counts) -> dict:
    total = sum(counts.values())
    return {c: counts[c] / total for c in LETTERS}


def tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a[c] - b[c]) for c in LETTERS)


def runs_between_spaces(text: str, run: int) -> list[int]:
    """Starts of the runs of `run` characters of text with a space just before and just after."""
    return [s for s in range(1, len(text) - run) if text[s - 1] == ' ' and text[s + run] == ' ']


def noise_floor(corpus_text: str, starts: list[int], reference: dict, size: int, run: int, trials: int = 1000,
                seed: int = 0) -> tuple[float, float]:
    """(mean, 95th percentile) of the TV between `reference` (the letter frequencies of the corpus'
    runs at `starts`) and those of `size` characters drawn from the corpus in runs of `run`
    characters at random `starts` (runs as long as the generated texts: neighbours are correlated),
    i.e. what sampling noise alone gives."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(trials):
        picks = torch.randint(0, len(starts), (max(size // run, 1),), generator=g).tolist()
        values.append(tv(frequencies(letter_counts([corpus_text[starts[k]:starts[k] + run] for k in picks])), reference))
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.quantile(0.95).item()


def corpus_continuation_ppl(judge_path, tokenizer, blocks) -> float:
    """Generative perplexity of the validation blocks' own continuations of their prompts (the first
    PROMPT_CHARS characters after BOS given): what continuations "as good as the data" would score."""
    import metrics
    judge = metrics.GenerativePerplexity(str(judge_path), tokenizer=tokenizer)
    generated = [[k > PROMPT_CHARS for k in range(len(b))] for b in blocks]
    return judge.compute(tokenizer.batch_decode(blocks), tokenizer.eos_token, token_ids=blocks, generated=generated)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=1000, help='training steps of the models (when trained here)')
    parser.add_argument('--samples', type=int, default=64, help='rows per sample_eval (and prompts in the file)')
    parser.add_argument('--sampling-steps', type=int, default=128, help='sampling.steps of the diffusion models')
    parser.add_argument('--seed', type=int, default=1, help='the models\' training seed (duo_small_scale: 1)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--work-dir', default='outputs/bench_duo_small_scale',
                        help="runs (duo_small_scale.py's work directory by default: its models are reused)")
    parser.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'conditional_small_scale.json'))
    args = parser.parse_args()
    work, run = open_work_dir(args.work_dir, args.threads)
    started = time.perf_counter()
    common = [*common_overrides(work, eval_batch=args.samples), f'seed={args.seed}']
    dirs, reused = {}, []
    for model in MODELS:
        dirs[model] = work / model
        if trained(dirs[model], args.steps):
            reused.append(model)
            print(f'reusing {dirs[model]} (trained for {args.steps} steps)', flush=True)
            continue
        run(f'train_{model}', 'mode=train', f'algo={model}', *common, *training_overrides(args.steps),
            f'hydra.run.dir={dirs[model]}')
    judge = dirs['ar'] / 'checkpoints' / 'last.ckpt'

    torch.set_num_threads(args.threads)
    blocks, tokenizer = validation_blocks(work)
    eos = tokenizer.eos_token_id
    corpus_texts = [tokenizer.decode([t for t in b[1:] if t != eos]) for b in blocks]
    prompted = [b for b in blocks if eos not in b[:1 + PROMPT_CHARS]][:args.samples]
    prompts = [tokenizer.decode(b[1:1 + PROMPT_CHARS]) for b in prompted]
    prompts_file = work / 'conditional_prompts.txt'
    prompts_file.write_text(''.join(p + '\n' for p in prompts))

    def sample(name, model, *overrides):
        out = work / f'{name}.json'
        steps = 8 if model == 'ar' else args.sampling_steps  # (AR draws one token per step)
        run(name, 'mode=sample_eval', f'algo={model}', *common, f'sampling.steps={steps}',
            'sampling.num_sample_batches=1', f'eval.gen_ppl_eval_model_name_or_path={judge}',
            f'eval.generated_samples_path={out}', f'hydra.run.dir={dirs[model]}', *overrides)
        return json.loads(out.read_text())

    results = {}
    for model in MODELS:
        results[f'{model}_unconditional'] = sample(f'cond_{model}_unconditional', model)
        results[f'{model}_prompts'] = sample(f'cond_{model}_prompts', model, f'sampling.prompts_file={prompts_file}')
        if model != 'ar':
            results[f'{model}_infill'] = sample(f'cond_{model}_infill', model, f'sampling.prompt="{TEMPLATE}"')
        results[f'{model}_semi_ar'] = sample(f'cond_{model}_semi_ar', model, 'sampling.semi_ar=true',
                                             'sampling.stride_length=32', 'sampling.num_strides=4')

    corpus_text = ''.join(corpus_texts)
    corpus = frequencies(letter_counts([corpus_text]))
    gap_starts = runs_between_spaces(corpus_text, GAP_CHARS)
    gaps = frequencies(letter_counts([corpus_text[s:s + GAP_CHARS] for s in gap_starts]))
    corpus_ppl = corpus_continuation_ppl(judge, tokenizer, prompted)
    rows = []
    for name, result in results.items():
        if name.endswith('_semi_ar'):
            continue
        texts = ([fill for gaps in result['infills'] for fill in gaps] if name.endswith('_infill')
                 else result.get('continuations', result['generated_seqs']))
        texts = [t.replace(tokenizer.eos_token, '').replace(tokenizer.bos_token, '') for t in texts]
        counts = letter_counts(texts)
        size = sum(counts.values())
        if name.endswith('_infill'):
            reference, run_length, starts = gaps, GAP_CHARS, gap_starts
        else:
            run_length = round(size / len(texts))
            reference, starts = corpus, range(len(corpus_text) - run_length)
        noise, noise95 = noise_floor(corpus_text, starts, reference, size, run_length)
        rows.append({'run': name, 'characters': size, 'frequencies': frequencies(counts),
                     'reference': 'corpus_gap_runs' if name.endswith('_infill') else 'corpus',
                     'tv_to_corpus': tv(frequencies(counts), reference),
                     'noise_floor': noise, 'noise_floor_95': noise95,
                     'generative_ppl': result['generative_ppl'], 'scored': result['scored'],
                     'example': result['generated_seqs'][0]})
    semi = {name: sorted({len(ids) for ids in result['token_ids']}) for name, result in results.items()
            if name.endswith('_semi_ar')}

    report = {
        'benchmark': 'conditional_small_scale',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch': torch.__version__,
                    'threads_per_run': args.threads, 'load_average_at_end': os.getloadavg()[0]},
        'settings': {**vars(args), 'corpus': str(CORPUS), 'template': TEMPLATE, 'prompt_characters': PROMPT_CHARS,
                     'reused_runs': reused},
        'corpus_frequencies': corpus,
        'corpus_gap_runs_frequencies': gaps,
        'corpus_continuation_generative_ppl': corpus_ppl,
        'letter_statistics': rows,
        'semi_ar_lengths': semi,
        'examples': {name: result['generated_seqs'][0] for name, result in results.items()},
        'seconds': {**run.seconds, 'total': round(time.perf_counter() - started, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')

    print(f'\nLetter frequencies (%) of the generated characters vs the corpus ({len(corpus_texts)} validation '
          f'blocks, {len(corpus_text)} characters); TV = total variation distance to the corpus, noise / 95% = the mean / '
          f'95th percentile of the TV of as many corpus characters (gap fills: vs the corpus\' runs of '
          f'{GAP_CHARS} characters between two spaces):')
    order = sorted(LETTERS, key=lambda c: -corpus[c])
    header = ''.join(f'{("sp" if c == " " else c):>5}' for c in order)
    print(f'  {"run":<22}{"chars":>6}{"TV":>7}{"noise":>7}{"95%":>7}{"gen ppl":>9}  {header}')
    print(f'  {"corpus":<22}{"":>6}{"":>7}{"":>7}{"":>7}{corpus_ppl:>9.2f}  ' + ''.join(f'{100 * corpus[c]:5.1f}' for c in order))
    print(f'  {f"corpus, gap runs":<22}{"":>6}{"":>7}{"":>7}{"":>7}{"":>9}  ' + ''.join(f'{100 * gaps[c]:5.1f}' for c in order))
    for r in rows:
        ppl = '-' if r['generative_ppl'] is None else f'{r["generative_ppl"]:.2f}'
        print(f'  {r["run"]:<22}{r["characters"]:>6}{r["tv_to_corpus"]:>7.3f}{r["noise_floor"]:>7.3f}{r["noise_floor_95"]:>7.3f}{ppl:>9}  '
              + ''.join(f'{100 * r["frequencies"][c]:5.1f}' for c in order))
    print('  (gen ppl: under the AR judge, the generated tokens only, the prompt or template being their context;\n'
          f'   corpus: the continuations of the same {len(prompted)} prompts in the validation blocks)')
    print('\nSemi-autoregressive lengths (tokens per sample; model.length = 64): ' +
          ', '.join(f'{name}: {lengths}' for name, lengths in semi.items()))
    for name, result in results.items():
        print(f'\n{name}: {result["generated_seqs"][0]}')
    print(f'\nTotal {report["seconds"]["total"] / 60:.1f} min; wrote {out}')


if __name__ == '__main__':
    main()
