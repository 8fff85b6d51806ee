"""Quickstart: train a CPU-sized DUO-base on the built-in corpus, evaluate it, print samples.

    python quickstart.py [--steps N] [--algo duo_base|mdlm|ar|duo] [extra Hydra overrides ...]

No download and no hub: the corpus is the Python standard library's docstrings (data=stdlib),
read character by character (the text8 alphabet), and the model is `model=micro`. It runs
the same three commands a user would type, printing each one first:
    python main.py mode=train ...      (re-running resumes from the last checkpoint)
    python main.py mode=ppl_eval ...   -> <run dir>/ppl_eval.json
    python main.py mode=sample_eval ... -> <run dir>/samples.json
"""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=600, help='training steps (default 600: about 3 min on 2 idle cores)')
    parser.add_argument('--algo', default='duo_base', help='ar | mdlm | duo_base | duo (default duo_base)')
    parser.add_argument('--run-dir', default='outputs/quickstart', help='outputs and checkpoints')
    args, overrides = parser.parse_known_args()
    run_dir = Path(args.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    common = [f'algo={args.algo}', 'data=stdlib', 'data.tokenizer_name_or_path=text8', 'model=micro',
              'model.length=128', 'loader.global_batch_size=32', 'optim.lr=1e-3',
              'lr_scheduler.num_warmup_steps=100', 'training.ema=0.99', f'hydra.run.dir={run_dir}']
    commands = [
        ['mode=train', f'trainer.max_steps={args.steps}', 'trainer.val_check_interval=200',
         'checkpointing.every_n_train_steps=200', *common, *overrides],
        ['mode=ppl_eval', *common, *overrides],
        ['mode=sample_eval', 'sampling.steps=128', 'sampling.num_sample_batches=1', 'loader.eval_batch_size=4',
         'eval.compute_generative_perplexity=false', *common, *overrides],
    ]
    for command in commands:
        argv = [sys.executable, 'main.py', *command]
        print('\n$ ' + shlex.join(['python', 'main.py', *command]), flush=True)
        if subprocess.run(argv, cwd=ROOT).returncode != 0:
            sys.exit(1)
    print(f'\nDone: checkpoints, ppl_eval.json and samples.json are in {run_dir}')


if __name__ == '__main__':
    main()
