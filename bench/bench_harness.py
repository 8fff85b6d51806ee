"""Throughput of the lm-eval likelihood estimators (likelihood.py), against an AR model of the same size.

DiTs with random weights score multiple-choice-shaped requests ([BOS] + context of --context tokens,
continuation of --continuation tokens): AR exactly (one forward pass per request), the diffusion
models with --samples Monte Carlo samples per request (mdlm: t and LLaDA forms; sedd, d3pm (its
clean pass once per request), duo_base: t), greedy flags included. Reported: requests/s,
sequences/s through the network, and each row's time per request relative to AR (medians of
--repeats round-robin passes). With --checkpoint, also the
standard errors of a trained model's log-likelihoods on the local task
(tests/lm_eval_tasks/duo_local_mc.jsonl), and its accuracy, at each sample count.

    python bench/bench_harness.py                                  # the default preset (see --help)
    python bench/bench_harness.py --samples 128 1024 --checkpoint outputs/<run>/checkpoints/last.ckpt
"""
import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import likelihood  # noqa: E402
from bench_sampling import run_record  # noqa: E402
from diffusion import Diffusion  # noqa: E402

ROWS = (('ar', 'exact'), ('mdlm', 't'), ('mdlm', 'llada'), ('sedd', 't'), ('d3pm', 't'), ('duo_base', 't'))


def random_model(algo, args):
    """A Diffusion module of `algo` with random weights (fresh adaLN and output layers are zero)."""
    overrides = [f'algo={algo}', f'model.hidden_size={args.hidden}', f'model.n_blocks={args.blocks}',
                 f'model.n_heads={args.heads}', f'model.cond_dim={args.cond}', 'model.dropout=0',
                 f'model.length={args.context + args.continuation + 1}', 'training.ema=0']
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        config = compose(config_name='config', overrides=overrides)
    torch.manual_seed(0)
    module = Diffusion(config, args.vocab, args.vocab - 1, args.vocab - 2)
    with torch.no_grad():
        for name, p in module.backbone.named_parameters():
            if 'norm' not in name:
                p.normal_(0, 0.02 if p.dim() == 2 else 0.01)
    return module.to(args.device).eval()


def requests(args):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(args.requests):
        tokens = torch.randint(0, args.vocab - 2, (args.context + args.continuation,), generator=g).tolist()
        prefix = [args.vocab - 2, *tokens[:args.context]]
        out.append(likelihood.Request(prefix, tokens[args.context:], (i,)))
    return out


class Row:
    """One estimator on its own random model, timed by `run` (forward rows counted)."""

    def __init__(self, algo, estimator, samples, args, reqs):
        self.algo, self.estimator, self.samples, self.reqs = algo, estimator, samples, reqs
        self.module = random_model(algo, args)
        self.scorer = likelihood.Scorer(self.module, args.batch, samples, 't' if estimator == 'exact' else estimator,
                                        precision=args.precision, show_progress=False)
        self.sync = torch.cuda.synchronize if args.device.type == 'cuda' else (lambda: None)
        self.rows, self.seconds = 0, []
        forward = self.module.backbone.forward

        def counted(x, *a, **k):
            self.rows += x.shape[0]
            return forward(x, *a, **k)
        self.module.backbone.forward = counted
        self.scorer.score(reqs[:2])  # warm-up

    def run(self):
        self.rows = 0
        self.sync()
        start = time.perf_counter()
        self.scores = self.scorer.score(self.reqs)
        self.sync()
        self.seconds.append(time.perf_counter() - start)

    def record(self):
        seconds = float(np.median(self.seconds))
        return {'algo': self.algo, 'estimator': self.estimator,
                'samples': 0 if self.estimator == 'exact' else self.samples, 'requests': len(self.reqs),
                'seconds': seconds, 'seconds_each_repeat': self.seconds, 'requests_per_s': len(self.reqs) / seconds,
                'sequences_per_s': self.rows / seconds, 'mean_ll': float(np.mean([s.ll for s in self.scores]))}


def standard_errors(path, samples, args):
    """Accuracy on the local task and the median, mean and largest standard error of its requests' ll."""
    import harness
    from lm_eval.api.instance import Instance
    docs = [json.loads(line) for line in (ROOT / 'tests' / 'lm_eval_tasks' / 'duo_local_mc.jsonl').open()]
    reqs = [Instance('loglikelihood', {}, (d['context'], c), 0) for d in docs for c in d['choices']]
    rows = []
    for estimator in ('t', 'llada'):
        for n in samples:
            try:
                model = harness.DLM(checkpoint_path=str(path), num_mc_samples=n, batch_size=args.batch,
                                    device=str(args.device), estimator=estimator, precision=args.precision)
            except ValueError:  # llada on a uniform-state or time-conditioned model
                continue
            model.scorer.show_progress = False
            lls = iter(ll for ll, _ in model.loglikelihood(reqs))
            correct = [int(np.argmax([next(lls) for _ in d['choices']])) == d['label'] for d in docs]
            se = np.array([s.se for s in model.scores])
            rows.append({'checkpoint': str(path), 'estimator': estimator, 'samples': n, 'acc': float(np.mean(correct)),
                         'se_median': float(np.median(se)), 'se_mean': float(se.mean()), 'se_max': float(se.max())})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--samples', nargs='+', type=int, default=[128])
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--blocks', type=int, default=4)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--cond', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=50258, help='K (the last id is the [MASK], the one before BOS)')
    parser.add_argument('--context', type=int, default=60, help='context tokens per request (after BOS)')
    parser.add_argument('--continuation', type=int, default=12)
    parser.add_argument('--requests', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3, help='timed passes per row (median reported)')
    parser.add_argument('--batch', type=int, default=64, help='sequences per forward pass (lm-eval --batch_size)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default='32')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--checkpoint', nargs='*', default=[], help='trained checkpoints: standard errors on the local task')
    parser.add_argument('--out', type=Path, default=ROOT / 'bench' / 'results')
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {**run_record(args, skip=('checkpoint',)), 'standard_errors': []}
    reqs = requests(args)
    rows = [Row(algo, estimator, n, args, reqs) for algo, estimator in ROWS
            for n in ([1] if estimator == 'exact' else args.samples)]
    for _ in range(args.repeats):  # round robin: a change of the machine's load hits every row alike
        for row in rows:
            row.run()
    print(f"{'algo':9} {'estimator':9} {'samples':>7} {'requests/s':>11} {'sequences/s':>12} {'time vs AR':>10}")
    ar_seconds = float(np.median(rows[0].seconds))
    for row in rows:
        result = row.record()
        result['time_vs_ar'] = result['seconds'] / ar_seconds
        record['results'].append(result)
        print(f"{result['algo']:9} {result['estimator']:9} {result['samples']:7d} {result['requests_per_s']:11.3g} "
              f"{result['sequences_per_s']:12.4g} {result['time_vs_ar']:10.1f}")
    for path in args.checkpoint:
        for row in standard_errors(path, args.samples, args):
            record['standard_errors'].append(row)
            print(f"standard error of ll, {Path(path).parent.parent.name} {row['estimator']:5} {row['samples']:5d} "
                  f"samples: median {row['se_median']:.3g}, mean {row['se_mean']:.3g}, max {row['se_max']:.3g} nats; "
                  f"local-task acc {row['acc']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"harness-{args.device.type}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
