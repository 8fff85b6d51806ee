"""lm-evaluation-harness model `dlm` for every duo checkpoint (SPEC-2 §16).

    python harness.py --model dlm --model_args checkpoint_path=<ckpt>,num_mc_samples=1024 \
        --tasks arc_easy --batch_size 64
    lm_eval --model dlm ...            # the same, after ./install.sh --lm-eval (lm_eval_plugin/)

`python harness.py` takes lm-eval's own command line (it registers `dlm`, then runs lm-eval's CLI).
From Python, importing this module registers `dlm`:
    import harness, lm_eval
    lm_eval.simple_evaluate(model='dlm', model_args='checkpoint_path=...', tasks=['arc_easy'])

model_args: checkpoint_path (ours, upstream DUO/MDLM .ckpt, a Hugging Face directory or hub id;
EMA weights), num_mc_samples (Monte Carlo samples per request for diffusion models; 1024 as
upstream), estimator (t: the NELBO at stratified times; llada: stratified masked counts, masked
models without time conditioning), seed, precision (auto | 32 | bf16 | 16), device (or --device);
lm-eval's --batch_size = sequences per forward pass. Upstream's loss_avg_mode, num_proc, max_length
and pretrained are accepted and ignored (with a warning), so its command lines keep working.

The scores (likelihood.py): AR exact; diffusion models minus an unbiased estimate of the conditional
NELBO with the context clamped, a lower bound on log p(continuation | context) in expectation;
sums over the continuation's tokens; over-length items lose their oldest context tokens. Every
Score (ll, greedy, standard error, tokens, dropped) is kept in `DLM.scores`, and each call logs a
summary of the standard errors.
"""
import logging
from pathlib import Path

import numpy as np
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

import checkpoints
import dataloader
import likelihood
import runtime
from errors import CheckpointError, ConfigError, DataError

log = logging.getLogger('duo')
ROOT = Path(__file__).resolve().parent
UPSTREAM_IGNORED = ('loss_avg_mode', 'num_proc', 'max_length', 'pretrained')
LM_EVAL_PASSED = ('trust_remote_code',)  # lm-eval's --trust_remote_code: checkpoints are read without code anyway


def load(checkpoint_path: str, device: torch.device):
    """(config, tokenizer, model in eval mode on `device`) of a checkpoint, configured from it and
    with its EMA weights (checkpoints.load_model)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        config = compose(config_name='config', overrides=['mode=ppl_eval'])
    source = checkpoints.read_source(checkpoint_path, 'checkpoint_path')
    checkpoints.configure_from(config, source, frozenset(), 'checkpoint_path')
    tokenizer = dataloader.get_tokenizer(config)
    model = checkpoints.load_model(config, tokenizer, source, setting='checkpoint_path')
    return config, tokenizer, model.to(device).eval()


def _batch_size(value) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f'--batch_size {value} is not supported: give the number of sequences per forward pass '
                          f'(e.g. --batch_size 64)')
    return size


def _show_logs():
    """This module's INFO lines (the standard errors, truncations) on stderr, in lm-eval's format, unless
    logging is configured already (lm-eval configures only its own logger)."""
    duo = logging.getLogger('duo')
    if not duo.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)-8s [duo] %(message)s', '%Y-%m-%d:%H:%M:%S'))
        duo.addHandler(handler)
        duo.setLevel(logging.INFO)
        duo.propagate = False


class DLM(TemplateLM):
    """lm-eval's model for duo checkpoints: loglikelihood and loglikelihood_rolling (no generation)."""

    def __init__(self, checkpoint_path=None, num_mc_samples=1024, batch_size=64, device=None, estimator='t',
                 seed=0, precision='auto', max_batch_size=None, **kwargs):
        super().__init__()
        _show_logs()
        for name in LM_EVAL_PASSED:
            kwargs.pop(name, None)
        unknown = sorted(set(kwargs) - set(UPSTREAM_IGNORED))
        if unknown:
            raise ConfigError(f'model_args {", ".join(unknown)} unknown to --model dlm: use checkpoint_path, '
                              f'num_mc_samples, estimator, seed, precision, device (e.g. --model_args '
                              f'checkpoint_path=outputs/run/checkpoints/last.ckpt,num_mc_samples=1024)')
        if kwargs:
            log.warning('model_args %s: upstream settings this adapter does not use (it always scores the '
                        'conditional likelihood of the continuation): ignored', ', '.join(sorted(kwargs)))
        if not checkpoint_path:
            raise ConfigError('--model dlm needs a checkpoint: --model_args checkpoint_path=<a .ckpt file, a Hugging '
                              'Face directory or hub id> (e.g. checkpoint_path=outputs/run/checkpoints/last.ckpt)')
        if estimator not in likelihood.ESTIMATORS:
            raise ConfigError(f'estimator={estimator} is unknown: use t or llada (e.g. estimator=t)')
        self._device = torch.device(device if device else 'cuda' if torch.cuda.is_available() else 'cpu')
        if self._device.type == 'cuda' and not torch.cuda.is_available():  # lm-eval's default is cuda:0
            log.warning('device=%s but no CUDA GPU is visible: using the CPU', device)
            self._device = torch.device('cpu')
        accelerator = 'gpu' if self._device.type == 'cuda' else 'cpu'
        self.precision = runtime.resolve_precision(str(precision), accelerator)
        self.config, self.tokenizer, self.model = load(str(checkpoint_path), self._device)
        self.bos_id = self.tokenizer.bos_token_id
        self.scorer = likelihood.Scorer(self.model, _batch_size(batch_size), int(num_mc_samples), str(estimator),
                                        int(seed), self.precision)
        if self.scorer.batch_size == 1 and not self.model.algo.exact_likelihood:
            log.warning('--batch_size 1 (lm-eval\'s default): one sequence per forward pass; pass e.g. --batch_size 64')
        self.scores: list[likelihood.Score] = []  # every Score of this model, in the order requested
        algo = self.config.algo.name
        what = ('exact log-likelihoods' if self.model.algo.exact_likelihood else
                f'minus the conditional NELBO (a lower bound), {num_mc_samples} samples, estimator={estimator}')
        log.info('dlm: %s (algo=%s, model.length=%d) on %s, %s: %s', checkpoint_path, algo,
                 int(self.config.model.length), self._device, runtime.SHORT.get(self.precision, self.precision), what)

    # ---- what lm-eval asks of a model --------------------------------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        return self.bos_id  # every training block starts with [BOS]

    @property
    def max_length(self) -> int:
        return self.scorer.capacity

    @property
    def tokenizer_name(self) -> str:
        return str(self.config.data.tokenizer_name_or_path)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=False))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """(ll, greedy) per request: [BOS] + context + continuation, split as lm-eval splits the joint
        encoding (trailing spaces of the context move to the continuation)."""
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context:
                context_ids, continuation_ids = self._encode_pair(context, continuation)
            else:
                context_ids, continuation_ids = [], self.tok_encode(continuation)
            pairs.append(((context, continuation), context_ids, continuation_ids))
        return self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        fitted = [likelihood.fit(self.bos_id, context, continuation, self.scorer.capacity)
                  for _, context, continuation in requests]
        scored = [likelihood.Request(tokens[:prefix], tokens[prefix:], tuple(tokens[:prefix]))
                  for tokens, prefix, _ in fitted]
        scores = self._score(scored, 'loglikelihood')
        for score, (_, _, dropped) in zip(scores, fitted):
            score.dropped = dropped
        over = [s.dropped for s in scores if s.dropped]
        if over:
            log.info('loglikelihood: %d over-length requests lost their oldest context tokens (up to %d) to fit '
                     'the model\'s %d tokens', len(over), max(over), self.scorer.capacity)
        return [(s.ll, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """log p(document) per request, summed over lm-eval's non-overlapping rolling windows (the first
        after [BOS], each later one after the previous window's last token(s)); for diffusion models
        the sum of the windows' bounds (a lower bound on the windowed model's log-likelihood)."""
        window = self.scorer.capacity - 1  # tokens predicted per window; plus one of context
        windows, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(tokens, self.bos_id, window, 1)):
                windows.append(likelihood.Request(list(context), list(continuation), (*context, *continuation)))
                owner.append(n)
        scores = self._score(windows, 'loglikelihood_rolling')
        totals, variances = np.zeros(len(requests)), np.zeros(len(requests))
        for n, score in zip(owner, scores):
            totals[n] += score.ll
            variances[n] += score.se ** 2
        log.info('loglikelihood_rolling: %d documents in %d windows of up to %d tokens; standard error of a '
                 'document\'s ll: median %.3g nats', len(requests), len(windows), window,
                 float(np.median(np.sqrt(variances))) if len(requests) else 0.0)
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError('--model dlm scores likelihoods only (loglikelihood, loglikelihood_rolling): '
                                  'pick multiple-choice or perplexity tasks')

    def _score(self, requests, what: str) -> list[likelihood.Score]:
        scores = self.scorer.score(requests)
        self.scores.extend(scores)
        if scores and not self.model.algo.exact_likelihood:
            se = np.array([s.se for s in scores if s.tokens])
            if len(se):
                log.info('%s: %d requests, %d samples each: standard error of ll median %.3g, mean %.3g, max %.3g '
                         'nats', what, len(scores), self.scorer.num_samples, np.median(se), se.mean(), se.max())
        return scores


if 'dlm' not in model_registry:  # lm_eval_plugin/ may have registered it already
    model_registry.register('dlm', target=DLM)


def main():
    """`python harness.py <lm-eval's arguments>`: lm-eval's CLI with `dlm` registered; bad input is one
    line on stderr and exit code 2."""
    import cli
    from lm_eval.__main__ import cli_evaluate
    runtime.go_offline_if_unreachable()
    try:
        cli_evaluate()
    except (ConfigError, DataError, CheckpointError) as e:
        cli.fail(str(e), 2)


if __name__ == '__main__':
    main()
