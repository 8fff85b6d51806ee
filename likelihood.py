"""Conditional log-likelihoods of continuations, the scoring behind lm-eval's `dlm` model (SPEC-2 §16).

lm-evaluation-harness asks a model for log p(continuation | context) of many (context, continuation)
pairs and picks the choice with the largest value (acc) or the largest value per byte of the
continuation (acc_norm), and sums them over documents for perplexity tasks: every value here is a
TOTAL over the continuation's tokens, never a mean. This module scores token sequences and never
imports lm-eval (harness.py wraps it as lm-eval's model), so the maths is tested without lm-eval.

A request is a prefix (for lm-eval's loglikelihood: [BOS] + context tokens, see `fit`) followed by
continuation tokens c_1..c_C:
- AR (exact): ll = sum_j log p(c_j | prefix, c_<j); greedy: the argmax at every continuation
  position is c_j (the [MASK] id excluded).
- Diffusion models: ll = -(an unbiased Monte Carlo estimate of the conditional NELBO of the
  clamped-prefix model, SPEC-2 §15/§16): the prefix is never noised, the continuation is noised
  by the model's own forward process, and the bound is summed over continuation positions only.
  In expectation ll is a LOWER bound on the log-likelihood of that model. The algorithm's hooks
  (algorithms.py: `likelihood_levels`, `conditional_bound`, `greedy_logits`) say how its noise and
  per-token bound look; this module draws the randomness, batches the samples of many requests
  together and averages them. Greedy: the deterministic decoding that commits, one position per
  forward pass, the most confident undecided continuation position to its argmax (masked models:
  undecided = [MASK]; uniform-state models: undecided positions hold uniform noise ids, the network
  told the noise level of the undecided fraction); greedy = that decoding reproduces c.

Randomness and determinism. Each request's samples come from its own generator, seeded from a hash
of the run seed and the request's key tokens, and are drawn in a fixed order (levels, uniforms,
replacement ids): an estimate never depends on which requests share its batches, on the batch
size, or on the device. lm-eval's loglikelihood keys a request by its prefix, so the choices of one
question share their noise levels (common random numbers: the differences that acc compares vary
less); rolling windows are keyed by all their tokens, so the windows of a document are independent.

Standard error. The S samples of a request are stratified in the noise level (one per stratum,
strata independent); Var(mean) is estimated by collapsing adjacent strata into pairs,
sum_pairs (y_2j - y_2j+1)^2 / S^2, which also counts the differences between neighbouring strata
means: a slight over-estimate.

Memory: logits only at the continuation positions (the network's output_rows), never (B, L, K).
"""
import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

import losses
import progress
import runtime
from errors import ConfigError, DataError

log = logging.getLogger(__name__)

ESTIMATORS = ('t', 'llada')  # t: the NELBO at stratified times; llada: stratified masked counts (masked models)


@dataclass
class Request:
    """Token ids: the prefix (never noised) and the continuation to score; `key` seeds its noise."""
    prefix: list
    continuation: list
    key: tuple


@dataclass
class Score:
    """ll: log-likelihood of the continuation (exact for AR, minus the bound's estimate for diffusion
    models), a sum over its tokens; se: its standard error (0 when exact); tokens: continuation
    tokens; dropped: context tokens dropped to fit the model (lm-eval's left truncation)."""
    ll: float
    greedy: bool
    se: float
    tokens: int
    dropped: int = 0


@dataclass
class Draw:
    """One sample's randomness per row: level (B,) (a time t, a masked-token count, or D3PM's step
    index), uniform (B, N) float32 (continuation positions; 2 elsewhere, never below a masking
    threshold) and ids (B, N) int64 (uniform replacement ids at continuation positions; the clean ids
    elsewhere)."""
    level: torch.Tensor
    uniform: torch.Tensor
    ids: torch.Tensor


def fit(bos: int, context: list, continuation: list, capacity: int) -> tuple[list, int, int]:
    """[BOS] + context + continuation, shortened to `capacity` tokens by dropping the oldest context
    tokens (lm-eval's rule; BOS stays first, as in every training block). Returns (tokens, prefix
    length, context tokens dropped); DataError when [BOS] + continuation alone exceed `capacity`."""
    room = capacity - 1 - len(continuation)
    if room < 0:
        raise DataError(f'a continuation of {len(continuation)} tokens does not fit the model: with [BOS] it needs '
                        f'{len(continuation) + 1} of the {capacity} tokens a scored sequence may have; use a model '
                        f'with a longer model.length or a task with shorter continuations')
    dropped = max(len(context) - room, 0)
    kept = list(context[dropped:])
    return [bos, *kept, *continuation], 1 + len(kept), dropped


def request_seed(seed: int, key, stream: str = 'bound') -> int:
    """A 63-bit seed from the run seed, a request's key tokens and the stream's name."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f'{int(seed)}:{stream}:'.encode())
    h.update(np.asarray(list(key), dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), 'little') >> 1


def stratified_se(values) -> float:
    """Standard error of the mean of S >= 2 stratified samples in stratum order (module docstring)."""
    y = np.asarray(values, dtype=np.float64)
    pairs = len(y) // 2
    if pairs == 0:
        return float('nan')
    d = y[0:2 * pairs:2] - y[1:2 * pairs:2]
    return math.sqrt(float((d * d).sum()) / len(y) ** 2 * len(y) / (2 * pairs))


def lowest_k(uniform: torch.Tensor, target: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: in each row the `counts` (B,) target positions with the smallest uniforms: a
    uniformly random subset of that size when the uniforms are iid."""
    u = torch.where(target, uniform, torch.full_like(uniform, float('inf')))
    ranks = u.argsort(dim=1).argsort(dim=1)
    return target & (ranks < counts[:, None])


def distinct_rows(*tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (u,), inverse (B,)): one row index per distinct row of the (B, N) tables taken together
    (the smallest such index), and for every row the position of its distinct row in `index`, so that
    f(rows[index])[inverse] == f(rows) for a row-wise f."""
    key = torch.cat([t.long() for t in tables], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), key.shape[0], dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, inverse, torch.arange(key.shape[0], device=key.device), 'amin')
    return first, inverse


def row_sums(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row sums (B,) float32 of `values` (n,), the entries of the True positions of rows (B, N)
    in row-major order (the order of the network's output_rows)."""
    index = rows.nonzero()[:, 0]
    return torch.zeros(rows.shape[0], dtype=torch.float32, device=values.device).index_add_(0, index, values.float())


class Scorer:
    """Scores Requests with a loaded model (diffusion.Diffusion with the weights to evaluate, e.g.
    from checkpoints.load_model: EMA applied) on `device`, `batch_size` sequences per forward pass."""

    def __init__(self, module, batch_size: int, num_samples: int = 1024, estimator: str = 't', seed: int = 0,
                 precision: str = '32', show_progress: bool = True):
        self.module, self.algo = module, module.algo
        self.batch_size, self.num_samples, self.seed = int(batch_size), int(num_samples), int(seed)
        self.estimator, self.precision, self.show_progress = estimator, precision, show_progress
        name = module.config.algo.name
        if self.batch_size < 1:
            raise ConfigError(f'batch_size={batch_size} must be >= 1 (e.g. --batch_size 64)')
        if not self.algo.exact_likelihood:
            offered = self.algo.likelihood_estimators()
            if not offered:
                raise ConfigError(f'algo={name} has no conditional likelihood for lm-eval yet: use an ar, mdlm, '
                                  f'sedd, d3pm, duo_base, duo or distillation checkpoint')
            if estimator not in offered:
                raise ConfigError(f'estimator={estimator} does not apply to algo={name}'
                                  f'{self.algo.estimator_note(estimator)}: use {" or ".join(offered)} '
                                  f'(e.g. estimator={offered[0]})')
            if self.num_samples < 2:
                raise ConfigError(f'num_mc_samples={num_samples} must be >= 2 (its standard error needs two '
                                  f'samples; e.g. num_mc_samples=128)')

    @property
    def device(self) -> torch.device:
        return next(self.module.backbone.parameters()).device

    @property
    def capacity(self) -> int:
        """Tokens a scored sequence may have: model.length (AR: one more, its last token is never input)."""
        return int(self.module.config.model.length) + int(self.algo.exact_likelihood)

    @torch.no_grad()
    def score(self, requests: list[Request]) -> list[Score]:
        """A Score per request, in order. Empty continuations have ll = 0 (log 1) exactly."""
        for r in requests:
            if not r.prefix:
                raise ValueError('a request needs a prefix of at least one token (e.g. [BOS])')
            if len(r.prefix) + len(r.continuation) > self.capacity:
                raise ValueError(f'a request of {len(r.prefix) + len(r.continuation)} tokens exceeds the '
                                 f'{self.capacity} a scored sequence may have (fit() shortens them)')
        scores = [Score(0.0, True, 0.0, 0) for _ in requests]
        todo = sorted((i for i, r in enumerate(requests) if r.continuation),
                      key=lambda i: -(len(requests[i].prefix) + len(requests[i].continuation)))
        if not todo:
            return scores
        if self.algo.exact_likelihood:
            self._exact(requests, todo, scores)
        else:
            self._bound(requests, todo, scores)
            self._greedy(requests, todo, scores)
        return scores

    # ---- batches ---------------------------------------------------------------------------
    def _rows(self, requests, segments):
        """x0, attention_mask, target (B, N) of the rows of `segments` [(request, count)], right-padded."""
        n = max(len(requests[i].prefix) + len(requests[i].continuation) for i, _ in segments)
        rows = sum(count for _, count in segments)
        x0 = torch.zeros(rows, n, dtype=torch.long)
        mask = torch.zeros(rows, n, dtype=torch.long)
        target = torch.zeros(rows, n, dtype=torch.bool)
        start = 0
        for i, count in segments:
            r = requests[i]
            p, c = len(r.prefix), len(r.continuation)
            x0[start:start + count, :p + c] = torch.tensor([*r.prefix, *r.continuation])
            x0[start:start + count, p + c:] = r.prefix[0]  # padding: any valid id (attention ignores it)
            mask[start:start + count, :p + c] = 1
            target[start:start + count, p:p + c] = True
            start += count
        device = self.device
        return x0.to(device), mask.to(device), target.to(device)

    def _autocast(self):
        return runtime.autocast(self.device.type, self.precision)

    def _report(self, desc, total, unit):
        return progress.Reporter(desc, total, unit) if self.show_progress else None

    # ---- AR: exact ------------------------------------------------------------------------
    def _exact(self, requests, todo, scores):
        reporter = self._report('Scoring (exact)', len(todo), 'requests')
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            x0, mask, target = self._rows(requests, [(i, 1) for i in chunk])
            with self._autocast():
                ll, greedy = self.algo.conditional_loglik(self.module, x0, mask, target)
            for j, i in enumerate(chunk):
                scores[i] = Score(float(ll[j]), bool(greedy[j]), 0.0, len(requests[i].continuation))
            if reporter:
                reporter.update(len(chunk))
        if reporter:
            reporter.close()

    # ---- diffusion: Monte Carlo bound ------------------------------------------------------
    def draws(self, request: Request) -> Draw:
        """The S samples' randomness of one request (CPU, from its own generator): levels (S,) in
        stratum order, uniforms (S, C), replacement ids (S, C)."""
        S, C = self.num_samples, len(request.continuation)
        g = torch.Generator().manual_seed(request_seed(self.seed, request.key))
        level = self.algo.likelihood_levels(S, C, g, self.estimator)
        uniform = torch.rand(S, C, generator=g)
        ids = torch.randint(0, self.module.vocab_size, (S, C), generator=g)
        return Draw(level, uniform, ids)

    def _bound(self, requests, todo, scores):
        S = self.num_samples
        values = {}
        drawn = {}
        reporter = self._report(f'Scoring ({S} samples of the bound)', len(todo) * S, 'samples')
        for segments in self._sample_batches(todo):
            x0, mask, target = self._rows(requests, [(i, k1 - k0) for i, k0, k1 in segments])
            level, uniform, ids = [], torch.full(x0.shape, 2.0), x0.cpu().clone()
            start = 0
            for i, k0, k1 in segments:
                if i not in drawn:
                    drawn[i] = self.draws(requests[i])
                d, r = drawn[i], requests[i]
                p, c = len(r.prefix), len(r.continuation)
                level.append(d.level[k0:k1])
                uniform[start:start + k1 - k0, p:p + c] = d.uniform[k0:k1]
                ids[start:start + k1 - k0, p:p + c] = d.ids[k0:k1]
                start += k1 - k0
            device = self.device
            draw = Draw(torch.cat(level).to(device), uniform.to(device), ids.to(device))
            with self._autocast():
                estimate = self.algo.conditional_bound(self.module, x0, mask, target, draw, self.estimator)
            estimate = estimate.double().cpu()
            start = 0
            for i, k0, k1 in segments:
                values.setdefault(i, torch.empty(S, dtype=torch.float64))[k0:k1] = estimate[start:start + k1 - k0]
                start += k1 - k0
                if k1 == S:
                    del drawn[i]
            if reporter:
                reporter.update(len(estimate))
        if reporter:
            reporter.close()
        for i in todo:
            v = values[i].numpy()
            scores[i] = Score(-float(v.mean()), False, stratified_se(v), len(requests[i].continuation))

    def _sample_batches(self, todo):
        """Batches of batch_size (request, first sample, end sample) segments: each request's S
        samples in order, requests in the order of `todo`."""
        S, batch, segments, room = self.num_samples, self.batch_size, [], self.batch_size
        for i in todo:
            k = 0
            while k < S:
                take = min(room, S - k)
                segments.append((i, k, k + take))
                k, room = k + take, room - take
                if room == 0:
                    yield segments
                    segments, room = [], batch
        if segments:
            yield segments

    def _greedy(self, requests, todo, scores):
        """Greedy flags of diffusion models (module docstring), batch_size requests at a time."""
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            x0, mask, target = self._rows(requests, [(i, 1) for i in chunk])
            noise = x0.cpu().clone()
            for j, i in enumerate(chunk):
                r = requests[i]
                p, c = len(r.prefix), len(r.continuation)
                g = torch.Generator().manual_seed(request_seed(self.seed, r.key + tuple(r.continuation), 'greedy'))
                noise[j, p:p + c] = torch.randint(0, self.module.vocab_size, (c,), generator=g)
            with self._autocast():
                hits = greedy_decodes(self.algo, self.module, x0, mask, target, noise.to(x0.device))
            for j, i in enumerate(chunk):
                scores[i].greedy = bool(hits[j])


def greedy_decodes(algo, module, x0, attention_mask, target, noise) -> torch.Tensor:
    """(B,) bool: confidence-ordered greedy decoding of the target positions reproduces x0 there.

    Each pass asks the algorithm for the logits of the undecided target positions
    (algo.greedy_logits), commits in every row the undecided position whose top probability is
    highest, and stops a row at its first wrong commitment (the decoding never revisits one).
    """
    undecided = target.clone()
    ok = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    alive = target.any(1)
    while bool(alive.any()):
        rows = alive.nonzero()[:, 0]
        und = undecided[rows]
        logits = algo.greedy_logits(module, x0[rows], attention_mask[rows], target[rows], und, noise[rows])
        pred = logits.argmax(-1)
        confidence = -losses.token_nll(logits, pred)
        best = torch.full(und.shape, float('-inf'), device=x0.device)
        best[und] = confidence.float()
        choice = best.argmax(1)
        picked = torch.zeros_like(und)
        picked[torch.arange(len(rows), device=x0.device), choice] = True
        hit = pred[picked[und]] == x0[rows, choice]
        ok[rows] &= hit
        undecided[rows] = und & ~picked
        alive[rows] = hit & undecided[rows].any(1)
    return ok
