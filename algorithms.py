"""The algorithms: AR, MDLM, SEDD, D3PM, DUO-base, DUO (curriculum) and DCD distillation.

Each algorithm is a small class that turns a clean batch x0 (B, L) into per-token losses and, for
sampling, into a denoiser; the maths lives in losses.py, noise_schedule.py, latents.py and
samplers.py. The Lightning module (diffusion.Diffusion) calls only the hooks of `Algorithm`, so an
algorithm's behaviour (its per-batch setup, its logged values, its checkpoint extras) stays in its
class: adding one means a class here, its pure maths, a configs/algo/<name>.yaml and tests.
"""
import copy
import functools
import logging
from dataclasses import dataclass

import torch

import latents
import likelihood
import losses
import noise_schedule
import runtime
import samplers
import settings
from errors import ConfigError

log = logging.getLogger(__name__)


class Algorithm:
    """The hooks diffusion.Diffusion calls. `module` is the Lightning module (or anything with its
    `backbone`, `ema`, `device` and `compute_dtype`)."""
    causal = False   # the DiT is causal (AR): no sigma_map, no adaLN
    # What the network's outputs mean: checkpoints load into any algorithm of the same family.
    family = None
    # The sampling.predictor values this algorithm samples with (settings.CHOICES lists them all).
    predictors = ('ancestral', 'ancestral_cache')

    def __init__(self, config, vocab_size: int, mask_id: int):
        self.config = config
        self.vocab_size, self.mask_id = vocab_size, mask_id

    def check(self, module):
        """Settings that depend on the module (e.g. its EMA) or on the algorithm (the sampler):
        ConfigError when they cannot work. Runs before a checkpoint's weights load."""
        predictor = self.config.sampling.predictor
        if predictor not in self.predictors:
            options = self.predictors[0] if len(self.predictors) == 1 else f"one of {', '.join(self.predictors)}"
            raise ConfigError(f"sampling.predictor={predictor} does not apply to algo={self.config.algo.name}"
                              f"{self.predictor_note(predictor)}: use {options} (e.g. sampling.predictor={self.predictors[0]})")

    def predictor_note(self, predictor: str) -> str:
        """Why `predictor` does not apply (inserted into check's one line), '' when obvious."""
        return ''

    def before_batch(self, module, step: int):
        """Per-batch setup before the loss of optimizer step `step` (e.g. the distillation teacher)."""

    def times(self, module, batch_size: int) -> torch.Tensor:
        """The times (batch_size,) of this rank's share of a global batch, passed to loss/eval_loss:
        t stratified over the global batch on [training.sampling_eps, 1] (SPEC §3), different on
        every DDP rank. Discrete-time algorithms draw step indices instead (D3PM)."""
        rank, world = runtime.rank_world()
        return noise_schedule.stratified_times(batch_size, self.config.training.sampling_eps, rank, world,
                                               device=module.device)

    def loss(self, module, x0, attention_mask, t, step):
        """Training loss: (per-token loss (B, L'), weights (B, L')) for x0 (B, L) and times t (B,)
        (what `times` drew)."""
        raise NotImplementedError

    def eval_loss(self, module, x0, attention_mask, t, step):
        """Validation loss: the likelihood bound (for most algorithms the training loss)."""
        return self.loss(module, x0, attention_mask, t, step)

    def log_values(self, step: int) -> dict:
        """Extra values to log at a training step, {name: float}."""
        return {}

    def save_extras(self, checkpoint: dict, step: int):
        """Add what a resume needs beyond weights, optimizer and EMA to `checkpoint`."""

    def load_extras(self, module, checkpoint: dict):
        """Restore what save_extras stored."""

    def sample(self, module, batch_size, length, generator=None, progress=False, fixed=None):
        """Samples (batch_size, length) int64 with the module's current weights; fixed = (mask (B, L)
        bool, tokens (B, L)): positions held at those tokens (prompts, infilling; SPEC-2 §15)."""
        raise NotImplementedError

    # ---- conditional likelihood (likelihood.py; lm-eval's `dlm` model in harness.py) ---------
    # Rows x0 (B, N) right-padded (attention_mask (B, N)); target (B, N) bool marks each row's
    # continuation, after a prefix that is never noised (SPEC-2 §16).
    exact_likelihood = False  # AR: exact log-likelihoods (conditional_loglik); else Monte Carlo bounds

    def likelihood_estimators(self) -> tuple:
        """The estimators (likelihood.ESTIMATORS) conditional_bound offers; () = none yet."""
        return ()

    def estimator_note(self, estimator: str) -> str:
        """Why `estimator` does not apply (inserted into the harness's one-line error), '' when obvious."""
        return ''

    def likelihood_levels(self, n: int, n_target: int, generator, estimator: str) -> torch.Tensor:
        """The noise levels (n,) of one request's n samples, stratified, in stratum order (its
        standard error pairs neighbours), drawn from `generator` (CPU); n_target continuation tokens."""
        raise NotImplementedError

    def conditional_bound(self, module, x0, attention_mask, target, draw, estimator) -> torch.Tensor:
        """One-sample estimates (B,) float32 of an upper bound on -log p(x0[target] | x0[~target]),
        summed over each row's target positions, from draw (likelihood.Draw) row by row."""
        raise NotImplementedError

    def greedy_logits(self, module, x0, attention_mask, target, undecided, noise) -> torch.Tensor:
        """Logits (n, K) at the n `undecided` target positions (row-major) while the other target
        positions hold their decided (clean) ids; noise (B, N): ids for undecided positions of
        uniform-state models (likelihood.greedy_decodes)."""
        raise NotImplementedError


class AR(Algorithm):
    """Autoregressive baseline: causal DiT, next-token cross-entropy."""
    causal = True
    family = 'ar'
    exact_likelihood = True

    def loss(self, module, x0, attention_mask, t, step):
        logits = module.backbone(x0, attention_mask=attention_mask)
        nll = losses.ar_nll(logits, x0, excluded_id=self.mask_id, reuse_logits=True)
        return nll, attention_mask[:, 1:]

    def sample(self, module, batch_size, length, generator=None, progress=False, fixed=None):
        """fixed must be a prompt (a prefix per row): it goes through the KV cache, then the rest is drawn."""
        sampling = self.config.sampling
        cache = module.backbone.init_kv_cache(batch_size, length, module.device, module.compute_dtype)

        def step(tokens):
            logits = module.backbone(tokens, kv_cache=cache)[:, -1].float()
            logits[:, self.mask_id] = float('-inf')
            return logits

        return samplers.sample_ar(step, batch_size, length, bos_id=module.bos_id,
                                  p_nucleus=sampling.p_nucleus, top_k=sampling.top_k,
                                  use_float64=sampling.use_float64, generator=generator,
                                  device=module.device, progress=progress, fixed=fixed)

    def conditional_loglik(self, module, x0, attention_mask, target):
        """Exact (log p(x0[target] | preceding tokens) summed per row (B,) float32, greedy (B,) bool):
        the logits at position j-1 predict token j; the first position is never a target."""
        rows = target[:, 1:]
        logits = module.backbone(x0[:, :-1], attention_mask=attention_mask[:, :-1], output_rows=rows)
        logits[:, self.mask_id] = float('-inf')  # the [MASK]/pad id is never predicted
        ids = x0[:, 1:][rows]
        ll = -likelihood.row_sums(losses.token_nll(logits, ids), rows)
        misses = likelihood.row_sums((logits.argmax(-1) != ids).float(), rows)
        return ll, misses == 0


class _Diffusion(Algorithm):
    """Shared by the diffusion algorithms: noise schedule, time conditioning and the sampler loop.

    Sampling (`sampling.predictor`): ancestral (ancestral_cache: MDLM's per-sequence cache) or psi,
    the Ψ-samplers of SPEC-2 §13 on samplers.sample_diffusion's uniform or absorbing steps (`kind`).
    An algorithm with another sampler (e.g. SEDD's analytic step) lists its predictors and
    overrides sampler_arguments / sample.
    """
    kind = None  # 'uniform' or 'absorbing' (samplers.sample_diffusion)
    predictors = ('ancestral', 'ancestral_cache', 'psi')
    # The sampling.noise_removal values the algorithm's sampler implements.
    noise_removals = samplers.NOISE_REMOVAL
    # Ψ weights below 0 (sampling.psi.negative_kappa) are distributions for absorbing steps only.
    negative_kappa = False

    def __init__(self, config, vocab_size, mask_id):
        super().__init__(config, vocab_size, mask_id)
        self.schedule = noise_schedule.get_schedule(config.noise)
        # False: the network always sees sigma = 0 (MDLM, and released models trained so).
        self.time_conditioning = bool(config.algo.time_conditioning)

    def check(self, module):
        super().check(module)
        sampling = self.config.sampling
        if sampling.noise_removal not in self.noise_removals:
            raise ConfigError(f"sampling.noise_removal={sampling.noise_removal} does not apply to "
                              f"algo={self.config.algo.name}: use {' or '.join(self.noise_removals)} "
                              f"(e.g. sampling.noise_removal=ancestral)")
        self.sampler_arguments(self.config.sampling)  # on the schedule the checkpoint brought

    def sampler_arguments(self, sampling) -> dict:
        """Keyword arguments of samplers.sample_diffusion for sampling.predictor: the per-sequence
        cache (ancestral_cache; with psi, at the steps with kappa = 1, where it is exact), and for psi
        the time grid and kappas (steps + 1,) float64 on the CPU (the sampler reads them as floats).
        Cheap (a bisection and S + 1 kappas): built at every sample()."""
        if sampling.predictor != 'psi':
            return {'cache': sampling.predictor == 'ancestral_cache'}
        if sampling.psi.negative_kappa and not self.negative_kappa:
            raise ConfigError(f"sampling.psi.negative_kappa=true is for absorbing diffusion (algo=mdlm or sedd), not "
                              f"algo={self.config.algo.name}: use sampling.psi.negative_kappa=false")
        try:
            grid, kappas = samplers.psi_schedule(int(sampling.steps), self.schedule.alpha,
                                                 **settings.psi_arguments(sampling))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return {'cache': True, 'grid': grid, 'kappas': kappas}

    def sigma(self, alpha_t):
        """Network conditioning (B,): sigma_t = -log alpha_t, or 0 without time conditioning."""
        sigma = -torch.log(alpha_t.reshape(-1))
        return sigma if self.time_conditioning else torch.zeros_like(sigma)

    def logits(self, module, xt, t, out=None):
        """Denoiser logits x_θ(z_t) (B, L, K) in the compute dtype, for the sampler; t (B,) float32."""
        return module.backbone(xt, self.sigma(self.schedule.alpha(t)), out=out)

    def sample(self, module, batch_size, length, generator=None, progress=False, fixed=None):
        sampling = self.config.sampling
        # On the CPU every step writes its logits into one buffer: a fresh (B, L, K) block per step
        # is mapped, page-faulted in and unmapped again by glibc (blocks over 32 MB get their own
        # mapping), about a fifth of the network's time. GPUs' caching allocator reuses memory anyway.
        buffer = None
        if module.device.type == 'cpu' and module.compute_dtype == torch.float32:
            buffer = torch.empty(batch_size, length, self.vocab_size)

        def logits_fn(xt, t):
            return self.logits(module, xt, t, out=None if buffer is None else buffer[:len(xt)])

        return samplers.sample_diffusion(
            logits_fn, batch_size, length, self.vocab_size,
            self.schedule.alpha, sampling.steps, kind=self.kind, mask_id=self.mask_id,
            noise_removal=sampling.noise_removal, p_nucleus=sampling.p_nucleus,
            use_float64=sampling.use_float64, generator=generator, device=module.device, progress=progress,
            fixed=fixed, **self.sampler_arguments(sampling))

    def likelihood_levels(self, n, n_target, generator, estimator):
        # times t ~ U[sampling_eps, 1], stratified as in training and validation (SPEC §3)
        return noise_schedule.stratified_times(n, float(self.config.training.sampling_eps), generator=generator)

    def _greedy_alpha(self, target, undecided):
        """alpha (B,) whose noise fraction 1 - alpha is the undecided share of each row's target."""
        share = undecided.sum(1) / target.sum(1).clamp(min=1)
        floor = float(self.schedule.alpha(torch.ones(())))
        return (1 - share.float()).clamp(min=floor)


class _Absorbing(_Diffusion):
    """Absorbing-state (masked) diffusion: z_t keeps each token w.p. alpha_t, else [MASK]."""
    kind = 'absorbing'

    def corrupt(self, x0, alpha):
        """z_t ~ Cat(alpha x + (1 - alpha) e_mask), alpha (B, 1) (or broadcastable to x0 (B, L))."""
        return torch.where(torch.rand(x0.shape, device=x0.device) < 1 - alpha, self.mask_id, x0)

    def predictor_note(self, predictor):
        # the cache skips the sequences with nothing to unmask, which needs unmask probabilities
        # that do not depend on the network (SEDD's and D3PM's do)
        return (' (its unmask probabilities need the network at every step: nothing to cache)'
                if predictor == 'ancestral_cache' else '')

    def greedy_logits(self, module, x0, attention_mask, target, undecided, noise):
        """Undecided positions masked; x̂ without the [MASK] class (MDLM's SUBS; SEDD's normalised score;
        D3PM's x̂ restricted to real tokens, as its last step draws)."""
        xt = torch.where(undecided, self.mask_id, x0)
        logits = module.backbone(xt, self.sigma(self._greedy_alpha(target, undecided)),
                                 attention_mask=attention_mask, output_rows=undecided)
        logits[:, self.mask_id] = float('-inf')
        return logits


class MDLM(_Absorbing):
    """Absorbing-state (masked) diffusion, SUBS parameterisation (no time conditioning by default).

    sampling.predictor=analytic samples with SEDD's analytic step on MDLM's score (SPEC-2 §11
    pitfalls: log s = log x_θ + log(alpha/(1 - alpha)), whose mass S is 1): the same law as the
    uncached ancestral sampler, through samplers.sedd_step.
    """
    family = 'subs'
    predictors = (*_Diffusion.predictors, 'remdm-conf', 'analytic')
    negative_kappa = True

    def sampler_arguments(self, sampling):
        if sampling.predictor == 'remdm-conf':
            return {'remdm_conf': True, 'cache': True}  # the cache serves the final noise removal
        if sampling.predictor == 'analytic':
            return {'step': functools.partial(samplers.sedd_step, normalised=True)}
        return super().sampler_arguments(sampling)

    def loss(self, module, x0, attention_mask, t, step):
        alpha, dalpha = self.schedule.alpha(t)[:, None], self.schedule.dalpha(t)[:, None]
        xt = self.corrupt(x0, alpha)
        # Unmasked positions cost nothing (SUBS): the network computes the masked positions' logits only.
        logits = module.backbone(xt, self.sigma(alpha), attention_mask=attention_mask, output_rows=xt == self.mask_id)
        return losses.mdlm_loss(logits, x0, xt, alpha, dalpha, self.mask_id, reuse_logits=True), attention_mask

    def likelihood_estimators(self):
        # LLaDA's form equals the NELBO in expectation only for a denoiser that ignores the time
        return ('t',) if self.time_conditioning else ('t', 'llada')

    def estimator_note(self, estimator):
        return (' (LLaDA\'s form needs a denoiser without time conditioning; this checkpoint has '
                'algo.time_conditioning=true)' if estimator == 'llada' else '')

    def likelihood_levels(self, n, n_target, generator, estimator):
        if estimator != 'llada':
            return super().likelihood_levels(n, n_target, generator, estimator)
        # l = ceil(C u) with u stratified on [0, 1): l ~ U{1..C}; n = m C gives every l exactly m times
        unit = noise_schedule.stratified_times(n, 0.0, generator=generator).double()
        return (unit * n_target).ceil().long().clamp(1, n_target)

    def conditional_bound(self, module, x0, attention_mask, target, draw, estimator):
        """Prefix never masked; t form: target positions masked w.p. 1 - alpha_t, weight
        -alpha'_t / (1 - alpha_t); LLaDA form: l = draw.level positions masked (a uniform l-subset),
        weight C / l. Either way weight x sum of -log x_theta[x0] over the masked positions (SPEC-2 §16)."""
        if estimator == 'llada':
            masked = likelihood.lowest_k(draw.uniform, target, draw.level)
            weight = target.sum(1) / draw.level
            sigma = torch.zeros(x0.shape[0], device=x0.device)
        else:
            alpha, dalpha = self.schedule.alpha(draw.level), self.schedule.dalpha(draw.level)
            masked = target & (draw.uniform < 1 - alpha[:, None])
            weight = -dalpha / (1 - alpha)
            sigma = self.sigma(alpha)
        bound = torch.zeros(x0.shape[0], device=x0.device)
        live = masked.any(1)  # a row with nothing masked costs nothing: no forward pass
        if bool(live.any()):
            m = masked[live]
            xt = torch.where(m, self.mask_id, x0[live])
            logits = module.backbone(xt, sigma[live], attention_mask=attention_mask[live], output_rows=m)
            nll = losses.token_nll(logits, x0[live][m], excluded_id=self.mask_id)
            bound[live] = weight[live].float() * likelihood.row_sums(nll, m)
        return bound


class SEDD(_Absorbing):
    """SEDD, absorbing score entropy (SPEC-2 §11): a time-conditioned score network whose logits l
    give the unnormalised x̂ u_j = exp(l_j)/(K - 1) at masked positions, trained and validated on the
    closed-form score entropy (an upper bound on the NLL), sampled with the `analytic` (Tweedie
    tau-leaping) predictor. As upstream, greedy noise removal is not offered; ancestral_cache is
    not either (the unmask probability of every masked token needs the network at every step).

    sampling.predictor=psi (not in upstream, which asserts `analytic`): the absorbing Ψ-step of
    SPEC-2 §13 on the normalised score x̂ = softmax_{j != mask}(l), i.e. MDLM's Ψ-sampler with SEDD's
    network as the denoiser. With κ = 1 (the sampling.psi.* defaults) it is the ancestral absorbing
    sampler: a masked token unmasks w.p. (α_s - α_t)/(1 - α_t) whatever the score's mass S, where
    `analytic` unmasks w.p. min(1, c S); both draw the token ∝ u_j, and they agree when S = 1.
    """
    family = 'score'
    predictors = ('analytic', 'psi')
    noise_removals = ('ancestral', 'none')
    negative_kappa = True  # the absorbing Ψ-step: ReMDM's sigma up to its own bound is a distribution

    def predictor_note(self, predictor):
        return (' (its ancestral sampler on the normalised score is sampling.predictor=psi with the default '
                'sampling.psi.*)' if predictor in ('ancestral', 'ancestral_cache') else '')

    def loss(self, module, x0, attention_mask, t, step):
        alpha, dalpha = self.schedule.alpha(t)[:, None], self.schedule.dalpha(t)[:, None]
        xt = self.corrupt(x0, alpha)
        # Unmasked positions' scores are unused: the network computes the masked positions' logits only.
        logits = module.backbone(xt, self.sigma(alpha), attention_mask=attention_mask, output_rows=xt == self.mask_id)
        return losses.sedd_loss(logits, x0, xt, alpha, dalpha, self.mask_id, reuse_logits=True), attention_mask

    def sampler_arguments(self, sampling):
        if sampling.predictor == 'psi':
            # sample_diffusion's absorbing steps read x̂ as the softmax of the logits without [MASK]:
            # the normalised score (the cache at the κ = 1 steps is exact, as for MDLM)
            return super().sampler_arguments(sampling)
        return {'step': samplers.sedd_step}

    def likelihood_estimators(self):
        return ('t',)

    def estimator_note(self, estimator):
        return ' (SEDD is scored by the t form of its score-entropy bound)' if estimator == 'llada' else ''

    def conditional_bound(self, module, x0, attention_mask, target, draw, estimator):
        """The score-entropy bound of the target at t = draw.level (SPEC-2 §11, §16): the prefix never
        masked, target positions masked w.p. 1 - alpha_t, sigma_t = -log alpha_t to the network, SEDD's
        per-token loss at (alpha_t, alpha'_t) summed over the masked positions: the MDLM bound of the
        normalised score plus the normalisation penalty S - 1 - log S >= 0 (weighted alike)."""
        alpha, dalpha = self.schedule.alpha(draw.level), self.schedule.dalpha(draw.level)
        masked = target & (draw.uniform < 1 - alpha[:, None])
        bound = torch.zeros(x0.shape[0], device=x0.device)
        live = masked.any(1)  # a row with nothing masked costs nothing: no forward pass
        if bool(live.any()):
            m = masked[live]
            xt = torch.where(m, self.mask_id, x0[live])
            logits = module.backbone(xt, self.sigma(alpha[live]), attention_mask=attention_mask[live], output_rows=m)
            per_token = losses.sedd_loss(logits, x0[live], xt, alpha[live, None], dalpha[live, None], self.mask_id)
            bound[live] = per_token.sum(1).float()
        return bound


class D3PM(_Absorbing):
    """Absorbing D3PM in discrete time (SPEC-2 §12): T = algo.T steps t_i = i/T, x̂ = softmax over all
    K classes (the [MASK] included unless algo.subs_masking), trained and validated on the discrete
    NELBO L_rec + T KL_i with i ~ U{1..T} stratified (every i, the last step i = 1 included).

    The sampler runs on the training grid: sampling.steps steps from t = 1 to t_1 = 1/T over grid
    points (all of them when sampling.steps >= T - 1, an evenly spread subset otherwise), drawing
    from p_θ(z_s | z_t) (samplers.d3pm_step: unmasked tokens never change), then noise removal is
    the last step t_1 -> 0 (ancestral: every remaining mask drawn from x̂ without the mask class;
    greedy: its argmax). Predictor 'ancestral' only: the unmask probabilities need the network."""
    family = 'mean'
    predictors = ('ancestral',)

    def __init__(self, config, vocab_size, mask_id):
        super().__init__(config, vocab_size, mask_id)
        T = config.algo.T
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ConfigError(f"algo.T={T} must be an integer >= 1 for algo=d3pm (e.g. algo.T=1000)")
        self.T = T
        self.subs_masking = bool(config.algo.subs_masking)

    def times(self, module, batch_size):
        """Step indices i (batch_size,) int64 in 1..T, stratified over the global batch per rank."""
        rank, world = runtime.rank_world()
        return noise_schedule.discrete_times(batch_size, self.T, rank, world, device=module.device)

    def _network(self, module, x, alpha, **kwargs):
        """The backbone's logits at sigma(alpha); the [MASK] logit -inf with algo.subs_masking."""
        logits = module.backbone(x, self.sigma(alpha).float(), **kwargs)
        if self.subs_masking:
            logits[..., self.mask_id] = float('-inf')
        return logits

    def logits(self, module, xt, t, out=None):
        return self._network(module, xt, self.schedule.alpha(t), out=out)

    def loss(self, module, x0, attention_mask, i, step):
        alpha_t, alpha_s = (a[:, None] for a in noise_schedule.discrete_alphas(self.schedule, i, self.T))
        xt = self.corrupt(x0, alpha_t)
        masked = xt == self.mask_id
        logits = self._network(module, xt, alpha_t, attention_mask=attention_mask, output_rows=masked)
        kl = losses.d3pm_loss(logits, x0, xt, alpha_t, alpha_s, self.T, self.mask_id, reuse_logits=True)
        # L_rec: a second pass, on the clean sequence at sigma = 0 (alpha_0 = 1)
        clean = self._network(module, x0, torch.ones_like(alpha_t), attention_mask=attention_mask)
        return losses.d3pm_reconstruction_loss(clean, x0, reuse_logits=True) + kl, attention_mask

    def sampler_arguments(self, sampling):
        # grid[k] = i_k / T with i_k from T down to 1: points of the training grid, evenly spread
        # (repeated points, when steps > T - 1, are zero-length steps: skipped by the sampler);
        # float64 on the CPU, as the Ψ grid (the sampler reads it as floats)
        steps = int(sampling.steps)
        k = torch.arange(steps + 1, dtype=torch.float64)
        i = torch.round(self.T - k * (self.T - 1) / steps)
        return {'step': samplers.d3pm_step, 'grid': i / self.T}

    def likelihood_estimators(self):
        return ('t',)

    def estimator_note(self, estimator):
        return (' (D3PM\'s bound is discrete in time: estimator=t draws its step indices i in 1..T)'
                if estimator == 'llada' else '')

    def likelihood_levels(self, n, n_target, generator, estimator):
        # step indices i ~ U{1..T}, stratified as in training
        return noise_schedule.discrete_times(n, self.T, generator=generator)

    def conditional_bound(self, module, x0, attention_mask, target, draw, estimator):
        """The discrete NELBO of the target at step i = draw.level (SPEC-2 §12, §16): the prefix never
        masked, target positions masked w.p. 1 - alpha(i/T), T KL_i with alpha_s = alpha((i - 1)/T)
        (1 at i = 1) summed over the masked positions, plus L_rec = -log x̂(x0, sigma = 0) summed over
        the target (the prefix's reconstruction is not part of the continuation's likelihood)."""
        alpha_t, alpha_s = noise_schedule.discrete_alphas(self.schedule, draw.level, self.T)
        masked = target & (draw.uniform < 1 - alpha_t[:, None])
        bound = self._reconstruction(module, x0, attention_mask, target)
        live = masked.any(1)  # a row with nothing masked: its KL_i is 0, no forward pass
        if bool(live.any()):
            m = masked[live]
            xt = torch.where(m, self.mask_id, x0[live])
            logits = self._network(module, xt, alpha_t[live], attention_mask=attention_mask[live], output_rows=m)
            kl = losses.d3pm_loss(logits, x0[live], xt, alpha_t[live, None], alpha_s[live, None], self.T, self.mask_id)
            bound[live] += kl.sum(1).float()
        return bound

    def _reconstruction(self, module, x0, attention_mask, target):
        """L_rec (B,) float32 of each row's target. It does not depend on the draw: one clean pass per
        distinct row (the samples of one request share theirs), not one per sample."""
        rows, inverse = likelihood.distinct_rows(x0, attention_mask, target)
        rows_target = target[rows]
        clean = self._network(module, x0[rows], torch.ones(len(rows), dtype=torch.float64, device=x0.device),
                              attention_mask=attention_mask[rows], output_rows=rows_target)
        per_token = losses.d3pm_reconstruction_loss(clean, x0[rows][rows_target])
        return likelihood.row_sums(per_token, rows_target)[inverse]

    def _greedy_alpha(self, target, undecided):
        # the grid's alpha(i/T) nearest to the undecided share's: the network was trained at those only
        alpha = super()._greedy_alpha(target, undecided).double()
        grid = self.schedule.alpha(torch.arange(1, self.T + 1, dtype=torch.float64, device=alpha.device) / self.T)
        return grid[(grid[None, :] - alpha[:, None]).abs().argmin(1)].float()


class DUOBase(_Diffusion):
    """Uniform-state diffusion with the exact continuous-time NELBO."""
    kind = 'uniform'
    family = 'uniform'

    def corrupt(self, x0, alpha):
        """z_t ~ Cat(alpha x + (1 - alpha)/K 1): keep x0 w.p. alpha, else a uniform id (maybe x0)."""
        uniform = torch.randint(0, self.vocab_size, x0.shape, device=x0.device)
        return torch.where(torch.rand(x0.shape, device=x0.device) < alpha, x0, uniform)

    def loss(self, module, x0, attention_mask, t, step):
        alpha, dalpha = self.schedule.alpha(t)[:, None], self.schedule.dalpha(t)[:, None]
        xt = self.corrupt(x0, alpha)
        logits = module.backbone(xt, self.sigma(alpha), attention_mask=attention_mask)
        return losses.duo_loss(logits, x0, xt, alpha, dalpha, reuse_logits=True), attention_mask

    def eval_loss(self, module, x0, attention_mask, t, step):
        # Always the exact DUO-base bound, also for its subclasses: their training losses bound nothing.
        return DUOBase.loss(self, module, x0, attention_mask, t, step)

    def likelihood_estimators(self):
        return ('t',)

    def conditional_bound(self, module, x0, attention_mask, target, draw, estimator):
        """The DUO-base NELBO (SPEC §4) of the target positions at t = draw.level, the prefix clean
        (the §15 clamped model: a bound for any denoiser), sigma_t = -log alpha_t to the network;
        also for DUO and distillation checkpoints (their training losses bound nothing)."""
        t = draw.level
        alpha, dalpha = self.schedule.alpha(t), self.schedule.dalpha(t)
        replaced = target & (draw.uniform >= alpha[:, None])  # kept w.p. alpha, else a uniform id (maybe x0)
        xt = torch.where(replaced, draw.ids, x0)
        logits = module.backbone(xt, self.sigma(alpha), attention_mask=attention_mask, output_rows=target)
        rows = target.nonzero()[:, 0]
        per_token = losses.duo_loss(logits, x0[target], xt[target], alpha[rows], dalpha[rows])
        return likelihood.row_sums(per_token, target)

    def greedy_logits(self, module, x0, attention_mask, target, undecided, noise):
        xt = torch.where(undecided, noise, x0)
        return module.backbone(xt, self.sigma(self._greedy_alpha(target, undecided)),
                               attention_mask=attention_mask, output_rows=undecided)


# ---- the DUO curriculum's settings -----------------------------------------------------------
# Each curriculum setting has two spellings (SPEC-2 §14): the flat key of the DUO paper's code and upstream
# main's key in the algo.curriculum block, both null unless given. {block key: (flat key, default)}.
CURRICULUM_KEYS = {
    'gamma_min': ('gamma_min', -3.55),
    'gamma_max': ('gamma_max', -1.85),
    'gumbel_tau_log10_start': ('gumbel_tau_log10_start', -3.0),
    'gumbel_tau_log10_end': ('gumbel_tau_log10_end', -3.0),
    'start': ('curriculum_start', 0),
    'end': ('curriculum_end', 500_000),
}
DEFAULT_TOP_K = 2  # the top-k modes' k when algo.curriculum.top_k is not given (upstream's -1 crashes)
# Upstream keys with no use here: accepted for its command lines, and ignored with a log line.
IGNORED_CURRICULUM_KEYS = {
    'integral_cache_path': 'no pickle is read: the operator is tabulated and cached as .npz under DUO_CACHE_DIR',
    'cache_dir': 'the fitted polynomial is cached as .npz under DUO_CACHE_DIR, keyed by K, the gamma range and '
                 'the degree',
    'n_series_terms': 'mode=series uses the exact tabulated operator, no truncated series',
}


@dataclass(frozen=True)
class CurriculumSettings:
    """The DUO curriculum as configured: mode, top_k (None for mode=simple: the full relaxed one-hot
    input), the gamma range, the temperature's log10 at start and end, the start and end steps."""
    mode: str
    top_k: int | None
    gamma_min: float
    gamma_max: float
    tau_log10_start: float
    tau_log10_end: float
    start: int
    end: int


def curriculum_settings(config, vocab_size: int) -> CurriculumSettings:
    """The curriculum settings of `config` (algo=duo) for a vocabulary of vocab_size ids: each from
    whichever spelling gives it (CURRICULUM_KEYS), else its default; ConfigError (one line) when the two
    spellings disagree, a value has the wrong type or range, or top_k does not fit the mode."""
    algo = config.algo
    block = algo.get('curriculum') or {}
    values, names = {}, {}
    for key, (flat, default) in CURRICULUM_KEYS.items():
        number = settings.setting_int if isinstance(default, int) else settings.setting_float
        given = {name: number(config, name, default) for name, value in
                 ((f'algo.curriculum.{key}', block.get(key)), (f'algo.{flat}', algo.get(flat))) if value is not None}
        if len(set(given.values())) > 1:
            (name_a, a), (name_b, b) = given.items()
            raise ConfigError(f"{name_a}={a} and {name_b}={b} disagree: give the setting once "
                              f"(e.g. {name_a}={a})")
        names[key] = next(iter(given), f'algo.{flat}')
        values[key] = next(iter(given.values()), default)
    if not values['gamma_min'] < values['gamma_max']:
        raise ConfigError(f"{names['gamma_min']}={values['gamma_min']} must be < {names['gamma_max']}="
                          f"{values['gamma_max']} (e.g. {names['gamma_min']}=-3.55 {names['gamma_max']}=-1.85)")
    if not 0 <= values['start'] <= values['end']:
        raise ConfigError(f"{names['start']}={values['start']} and {names['end']}={values['end']} must satisfy "
                          f"0 <= start <= end (e.g. {names['start']}=0 {names['end']}=500000)")
    mode = block.get('mode', 'simple')
    noise_schedule.check_curriculum_mode(mode)
    top_k = None
    if block.get('top_k') is not None:
        if mode == 'simple':
            raise ConfigError(f"algo.curriculum.top_k={block.get('top_k')} needs a top-k mode: algo.curriculum.mode=simple "
                              f"feeds the full relaxed one-hot (e.g. algo.curriculum.mode=poly9 "
                              f"algo.curriculum.top_k={block.get('top_k')})")
        top_k = settings.setting_int(config, 'algo.curriculum.top_k', DEFAULT_TOP_K)
        if not 1 <= top_k <= vocab_size - 1:
            raise ConfigError(f"algo.curriculum.top_k={top_k} must be in [1, K-1 = {vocab_size - 1}] "
                              f"(e.g. algo.curriculum.top_k={DEFAULT_TOP_K})")
    elif mode != 'simple':
        top_k = min(DEFAULT_TOP_K, vocab_size - 1)
    return CurriculumSettings(mode, top_k, values['gamma_min'], values['gamma_max'], values['gumbel_tau_log10_start'],
                              values['gumbel_tau_log10_end'], values['start'], values['end'])


class DUO(DUOBase):
    """DUO: the Gaussian-duality curriculum until `curriculum_end`, then DUO-base (SPEC §5, SPEC-2 §14).

    During the curriculum z_t = argmax(w) with w = alpha~ x + sigma~ eps the Gaussian latent, the loss
    is the DUO-base loss at alpha_t, alpha'_t of the curriculum operator (exact: T(gamma_t),
    T'(gamma_t)(gamma_max - gamma_min); poly modes: the fitted polynomial in t and its derivative), and
    the network sees a relaxation of z_t: with mode=simple softmax(w / tau) over the whole vocabulary,
    in the top-k modes the k largest coordinates of w as ids and weights (latents.topk_relaxed_latent).
    Validation always reports the exact DUO-base bound with the configured noise schedule: the
    curriculum loss only covers the alphas of [gamma_min, gamma_max] and feeds the network more than
    z_t, so it bounds nothing.
    """

    def __init__(self, config, vocab_size, mask_id):
        super().__init__(config, vocab_size, mask_id)
        c = curriculum_settings(config, vocab_size)
        self.mode, self.top_k = c.mode, c.top_k
        self.curriculum = noise_schedule.curriculum_operator(c.mode, c.gamma_min, c.gamma_max, vocab_size)
        if isinstance(self.curriculum, noise_schedule.PolyCurriculum):
            check_fitted_operator(self.curriculum, c.mode)
        self.start, self.end = c.start, c.end
        self.log10_tau_start, self.log10_tau_end = c.tau_log10_start, c.tau_log10_end
        block = config.algo.get('curriculum') or {}
        for key, why in IGNORED_CURRICULUM_KEYS.items():
            if block.get(key) is not None:
                log.info('algo.curriculum.%s=%s is accepted for upstream command lines and ignored: %s',
                         key, block.get(key), why)
        self._announced_end = False

    def tau(self, step):
        """Softmax temperature: 10^start until curriculum_start, log-linear to 10^end at curriculum_end."""
        frac = min(max((step - self.start) / max(self.end - self.start, 1), 0.0), 1.0)
        return 10 ** (self.log10_tau_start + frac * (self.log10_tau_end - self.log10_tau_start))

    def in_curriculum(self, step):
        return step < self.end

    def before_batch(self, module, step):
        if not self.in_curriculum(step) and not self._announced_end:
            log.info('Curriculum over (step %d >= algo.curriculum_end=%d): training with the exact DUO-base loss',
                     step, self.end)
            self._announced_end = True

    def log_values(self, step):
        # Logged at every step (Lightning would otherwise repeat the last value): after the
        # curriculum, 0, the limit tau -> 0 in which softmax(w / tau) is the one-hot z_t.
        return {'train/tau': self.tau(step) if self.in_curriculum(step) else 0.0}

    def loss(self, module, x0, attention_mask, t, step):
        if not self.in_curriculum(step):
            return super().loss(module, x0, attention_mask, t, step)
        gamma = self.curriculum.gamma(t)
        alpha, dalpha = self.curriculum.alpha(t)[:, None], self.curriculum.dalpha(t)[:, None]
        if self.top_k is None:
            xt, weights = latents.relaxed_gaussian_latent(x0, gamma, self.vocab_size, self.tau(step))
            logits = module.backbone(weights, self.sigma(alpha), attention_mask=attention_mask)
        else:
            xt, ids, weights = latents.topk_relaxed_latent(x0, gamma, self.vocab_size, self.tau(step), self.top_k)
            logits = module.backbone(ids, self.sigma(alpha), attention_mask=attention_mask, weights=weights)
        del weights
        return losses.duo_loss(logits, x0, xt, alpha, dalpha, reuse_logits=True), attention_mask


def check_fitted_operator(operator, mode: str, points: int = 1001):
    """ConfigError unless the fitted alpha_t is a noise schedule on [0, 1]: 0 < alpha_t <= 1 and
    alpha'_t < 0 at `points` equally spaced t (outside that a loss weight alpha'_t / alpha_t changes sign
    or sigma = -log alpha_t is undefined); logs its distance to the exact operator."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    alpha, dalpha = operator.alpha(t), operator.dalpha(t)
    where = f'gamma in [{operator.gamma_min}, {operator.gamma_max}] (K={operator.vocab_size})'
    if not ((alpha > 0) & (alpha <= 1) & (dalpha < 0)).all():
        raise ConfigError(f"algo.curriculum.mode={mode} cannot represent the duality operator on {where}: the fitted "
                          f"alpha_t leaves (0, 1] or stops decreasing; use the exact operator with the top-k input "
                          f"(algo.curriculum.mode=efficient_cached) or narrow the gamma range")
    exact = noise_schedule.GaussianCurriculum(operator.gamma_min, operator.gamma_max, operator.vocab_size)
    log.info('algo.curriculum.mode=%s on %s: max |alpha - T| = %.2g, max |alpha\' - T\'| / |T\'| = %.2g', mode, where,
             (alpha - exact.alpha(t)).abs().max().item(), ((dalpha - exact.dalpha(t)) / exact.dalpha(t)).abs().max().item())


class Distillation(DUOBase):
    """Discrete Consistency Distillation (SPEC §5, DUO paper Alg. 1).

    The teacher (a frozen snapshot of the student, or of its EMA, taken at the start of every round
    of `update_teacher_every` steps) sees z_s, the student z_t, both the argmax of Gaussian latents
    sharing one eps; the student matches the teacher's prediction. Validation reports the exact
    DUO-base bound of the student (the KL to the teacher bounds nothing).

    The teacher belongs to this object, not to the Lightning module: it is neither in the module's
    state_dict (save_extras stores it once, and only when a resume needs it), nor optimised, nor
    switched to train mode by Lightning.
    """

    def __init__(self, config, vocab_size, mask_id):
        super().__init__(config, vocab_size, mask_id)
        algo = config.algo
        self.curriculum = noise_schedule.GaussianCurriculum(algo.gamma_min, algo.gamma_max, vocab_size)
        self.T, self.every = int(algo.T), int(algo.update_teacher_every)
        if self.T < 1:
            raise ConfigError(f"algo.T={algo.T} must be >= 1 (e.g. algo.T=512)")
        if self.every < 1:
            raise ConfigError(f"algo.update_teacher_every={algo.update_teacher_every} must be >= 1 "
                              f"(e.g. algo.update_teacher_every=10000)")
        self.teacher_ema = bool(algo.teacher_ema)
        self.linear_growth = bool(algo.linear_growth_dt)
        self.growth_min, self.growth_max = float(algo.linear_growth_min), float(algo.linear_growth_max)
        if self.linear_growth and not 0 < self.growth_min <= self.growth_max <= 1:
            raise ConfigError(f"algo.linear_growth_min={algo.linear_growth_min} and algo.linear_growth_max="
                              f"{algo.linear_growth_max} must satisfy 0 < min <= max <= 1 "
                              f"(e.g. algo.linear_growth_min=0.001 algo.linear_growth_max=0.25)")
        if algo.loss_type not in ('kl-bwd', 'kl-fwd'):
            raise ConfigError(f"algo.loss_type={algo.loss_type!r} is unknown; use kl-bwd or kl-fwd "
                              f"(e.g. algo.loss_type=kl-bwd)")
        self.loss_type = algo.loss_type
        self.max_steps = int(config.trainer.max_steps)
        self.teacher = None       # created at the first batch
        self.teacher_round = -1   # the round whose snapshot the teacher holds; -1: none yet

    def check(self, module):
        super().check(module)
        if self.teacher_ema and module.ema is None:
            raise ConfigError(f"algo.teacher_ema=true needs an EMA of the student but training.ema="
                              f"{self.config.training.ema}: set training.ema (e.g. training.ema=0.999) or "
                              f"algo.teacher_ema=false")

    def round(self, step):
        """Distillation round of an optimizer step: the teacher is refreshed when it changes."""
        return step // self.every

    def delta(self, step):
        """Distillation step size: 2^round / T, or linear growth from min to max over trainer.max_steps."""
        if self.linear_growth:
            frac = min(step / max(self.max_steps, 1), 1.0)
            return self.growth_min + frac * (self.growth_max - self.growth_min)
        return min(2 ** self.round(step) / self.T, 1.0)

    def before_batch(self, module, step):
        distill_round = self.round(step)
        if distill_round != self.teacher_round:
            self.refresh_teacher(module, distill_round)
            log.info('Distillation round %d from step %d: teacher refreshed, delta = %.6g', distill_round, step,
                     self.delta(step))
        self._place_teacher(module.backbone)

    @torch.no_grad()
    def refresh_teacher(self, module, distill_round):
        """Teacher <- the student's current weights (or its EMA with algo.teacher_ema=true)."""
        teacher = self._place_teacher(module.backbone)
        source = module.ema.shadow_params if self.teacher_ema else list(module.backbone.parameters())
        for dst, src in zip(teacher.parameters(), source):
            dst.copy_(src)
        self.teacher_round = distill_round

    def _place_teacher(self, backbone):
        """The teacher (created as a frozen, eval-mode copy of the backbone) on the backbone's device
        and dtype: Lightning moves only the module's own submodules."""
        if self.teacher is None:
            self.teacher = copy.deepcopy(backbone).requires_grad_(False).eval()
        ref, mine = next(backbone.parameters()), next(self.teacher.parameters())
        if (mine.device, mine.dtype) != (ref.device, ref.dtype):
            self.teacher.to(device=ref.device, dtype=ref.dtype)
        return self.teacher

    def log_values(self, step):
        return {'train/delta': self.delta(step)}

    def loss(self, module, x0, attention_mask, t, step):
        dt = self.delta(step)
        t = (t + dt).clamp(0, 1)
        s = t - dt
        g = self.curriculum
        zt, zs = latents.shared_noise_latents(x0, g.gamma(t), g.gamma(s), self.vocab_size)
        alpha_t, alpha_s = g.alpha(t)[:, None], g.alpha(s)[:, None]
        student = module.backbone(zt, self.sigma(alpha_t), attention_mask=attention_mask)
        with torch.no_grad():
            teacher = self.teacher(zs, self.sigma(alpha_s), attention_mask=attention_mask)
        return losses.distillation_kl(student, teacher, self.loss_type), attention_mask

    def save_extras(self, checkpoint, step):
        # The teacher is a snapshot of the student (or EMA) at its round's first step, stored nowhere
        # else. A checkpoint at a round boundary does not need it: the resumed run takes a fresh
        # snapshot at its first step, exactly as the uninterrupted run does.
        if self.teacher is not None and self.round(step) == self.teacher_round:
            checkpoint['teacher'] = {'round': self.teacher_round, 'state_dict': self.teacher.state_dict()}

    def load_extras(self, module, checkpoint):
        self.teacher_round = -1  # no stored teacher: the first training step takes a new snapshot
        if 'teacher' in checkpoint:
            self._place_teacher(module.backbone).load_state_dict(checkpoint['teacher']['state_dict'])
            self.teacher_round = checkpoint['teacher']['round']


ALGORITHMS = {'ar': AR, 'mdlm': MDLM, 'sedd': SEDD, 'd3pm': D3PM, 'duo_base': DUOBase, 'duo': DUO,
              'distillation': Distillation}


def build(config, vocab_size: int, mask_id: int) -> Algorithm:
    name = config.algo.name
    if name not in ALGORITHMS:
        raise ConfigError(f"algo={name} is unknown: use one of {', '.join(sorted(ALGORITHMS))} (e.g. algo=duo_base)")
    return ALGORITHMS[name](config, vocab_size, mask_id)


def family(name: str) -> str:
    """The family of algorithm `name` (what its network outputs mean)."""
    return ALGORITHMS[name].family
