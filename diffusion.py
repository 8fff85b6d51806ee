"""The Lightning module and the algorithms: AR, MDLM, DUO-base, DUO (curriculum) and DCD distillation.

Each algorithm is a small class that turns a clean batch x0 (B, L) into per-token losses (B, L)
and, for sampling, into a denoiser; the maths lives in losses.py, noise_schedule.py, latents.py
and samplers.py. `Diffusion` is the Lightning plumbing around them: optimisation, EMA, seeding,
validation metrics and checkpoint extras.
"""
import copy
import logging
import math

import lightning as L
import torch
from omegaconf import OmegaConf

import latents
import losses
import noise_schedule
import runtime
import samplers
from ema import EMA
from errors import RunStopped
from metrics import NLLMetric
from models.dit import DiT

log = logging.getLogger(__name__)


class AR:
    """Autoregressive baseline: causal DiT, next-token cross-entropy."""
    causal = True

    def __init__(self, config, vocab_size, mask_id):
        self.vocab_size, self.mask_id = vocab_size, mask_id

    def loss(self, module, x0, attention_mask, t, step):
        logits = module.backbone(x0, attention_mask=attention_mask)
        nll = losses.ar_nll(logits, x0, excluded_id=self.mask_id, reuse_logits=True)
        return nll, attention_mask[:, 1:]

    def eval_loss(self, module, x0, attention_mask, t, step):
        return self.loss(module, x0, attention_mask, t, step)

    def sample(self, module, batch_size, length, config, generator=None, progress=False):
        sampling = config.sampling
        cache = module.backbone.init_kv_cache(batch_size, length, module.device, module.compute_dtype)

        def step(tokens):
            logits = module.backbone(tokens, kv_cache=cache)[:, -1].float()
            logits[:, self.mask_id] = float('-inf')
            return logits

        return samplers.sample_ar(step, batch_size, length, bos_id=module.bos_id,
                                  p_nucleus=sampling.p_nucleus, top_k=sampling.top_k,
                                  use_float64=sampling.use_float64, generator=generator,
                                  device=module.device, progress=progress)


class _Diffusion:
    """Shared by the diffusion algorithms: noise schedule and the sampler loop."""
    causal = False
    kind = None  # 'uniform' or 'absorbing' (samplers.sample_diffusion)

    def __init__(self, config, vocab_size, mask_id):
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.schedule = noise_schedule.get_schedule(config.noise)

    def sigma(self, alpha_t):
        """Network conditioning sigma_t = -log alpha_t, (B,)."""
        return -torch.log(alpha_t.reshape(-1))

    def eval_loss(self, module, x0, attention_mask, t, step):
        """Per-token validation loss: the likelihood bound (SPEC §4); for most algorithms the training loss."""
        return self.loss(module, x0, attention_mask, t, step)

    def logits(self, module, xt, t, out=None):
        """Denoiser logits x_θ(z_t) (B, L, K) in the compute dtype, for the sampler; t (B,) float32."""
        return module.backbone(xt, self.sigma(self.schedule.alpha(t)), out=out)

    def sample(self, module, batch_size, length, config, generator=None, progress=False):
        sampling = config.sampling
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
            use_float64=sampling.use_float64, cache=sampling.predictor == 'ancestral_cache',
            generator=generator, device=module.device, progress=progress)


class MDLM(_Diffusion):
    """Absorbing-state (masked) diffusion, SUBS parameterisation, no time conditioning."""
    kind = 'absorbing'

    def sigma(self, alpha_t):
        return torch.zeros_like(alpha_t.reshape(-1))

    def loss(self, module, x0, attention_mask, t, step):
        alpha, dalpha = self.schedule.alpha(t)[:, None], self.schedule.dalpha(t)[:, None]
        xt = torch.where(torch.rand(x0.shape, device=x0.device) < 1 - alpha, self.mask_id, x0)
        # Unmasked positions cost nothing (SUBS): the network computes the masked positions' logits only.
        logits = module.backbone(xt, self.sigma(alpha), attention_mask=attention_mask, output_rows=xt == self.mask_id)
        return losses.mdlm_loss(logits, x0, xt, alpha, dalpha, self.mask_id, reuse_logits=True), attention_mask


class DUOBase(_Diffusion):
    """Uniform-state diffusion with the exact continuous-time NELBO."""
    kind = 'uniform'

    def corrupt(self, x0, alpha):
        """z_t ~ Cat(alpha x + (1 - alpha)/K 1): keep x0 w.p. alpha, else a uniform id (maybe x0)."""
        uniform = torch.randint(0, self.vocab_size, x0.shape, device=x0.device)
        return torch.where(torch.rand(x0.shape, device=x0.device) < alpha, x0, uniform)

    def loss(self, module, x0, attention_mask, t, step):
        alpha, dalpha = self.schedule.alpha(t)[:, None], self.schedule.dalpha(t)[:, None]
        xt = self.corrupt(x0, alpha)
        logits = module.backbone(xt, self.sigma(alpha), attention_mask=attention_mask)
        return losses.duo_loss(logits, x0, xt, alpha, dalpha, reuse_logits=True), attention_mask


class DUO(DUOBase):
    """DUO: the Gaussian-duality curriculum until `curriculum_end`, then DUO-base (SPEC §5).

    During the curriculum z_t = argmax(w) with w = alpha~ x + sigma~ eps the Gaussian latent,
    the network sees the relaxed one-hot softmax(w / tau), and the loss is the DUO-base loss at
    alpha_t = T(gamma_t), alpha'_t = T'(gamma_t)(gamma_max - gamma_min). Validation always reports
    the exact DUO-base bound with the configured noise schedule: the curriculum loss only covers
    the alphas of [gamma_min, gamma_max] and feeds the network more than z_t, so it bounds nothing.
    """

    def __init__(self, config, vocab_size, mask_id):
        super().__init__(config, vocab_size, mask_id)
        algo = config.algo
        self.curriculum = noise_schedule.GaussianCurriculum(algo.gamma_min, algo.gamma_max, vocab_size)
        self.start, self.end = int(algo.curriculum_start), int(algo.curriculum_end)
        if not 0 <= self.start <= self.end:
            raise ValueError(f"algo.curriculum_start={algo.curriculum_start} and algo.curriculum_end={algo.curriculum_end} "
                             f"must satisfy 0 <= start <= end (e.g. algo.curriculum_start=0 algo.curriculum_end=500000)")
        self.log10_tau_start, self.log10_tau_end = algo.gumbel_tau_log10_start, algo.gumbel_tau_log10_end

    def tau(self, step):
        """Softmax temperature: 10^start until curriculum_start, log-linear to 10^end at curriculum_end."""
        frac = min(max((step - self.start) / max(self.end - self.start, 1), 0.0), 1.0)
        return 10 ** (self.log10_tau_start + frac * (self.log10_tau_end - self.log10_tau_start))

    def in_curriculum(self, step):
        return step < self.end

    def loss(self, module, x0, attention_mask, t, step):
        if not self.in_curriculum(step):
            return super().loss(module, x0, attention_mask, t, step)
        gamma = self.curriculum.gamma(t)
        alpha, dalpha = self.curriculum.alpha(t)[:, None], self.curriculum.dalpha(t)[:, None]
        xt, weights = latents.relaxed_gaussian_latent(x0, gamma, self.vocab_size, self.tau(step))
        logits = module.backbone(weights, self.sigma(alpha), attention_mask=attention_mask)
        del weights
        return losses.duo_loss(logits, x0, xt, alpha, dalpha, reuse_logits=True), attention_mask

    def eval_loss(self, module, x0, attention_mask, t, step):
        return DUOBase.loss(self, module, x0, attention_mask, t, step)


class Distillation(DUOBase):
    """Discrete Consistency Distillation (SPEC §5, DUO paper Alg. 1).

    The teacher (a frozen snapshot of the student, or of its EMA, taken at the start of every round
    of `update_teacher_every` steps; held by the Lightning module) sees z_s, the student z_t, both
    the argmax of Gaussian latents sharing one eps; the student matches the teacher's prediction.
    Validation reports the exact DUO-base bound of the student (the KL to the teacher bounds nothing).
    """

    def __init__(self, config, vocab_size, mask_id):
        super().__init__(config, vocab_size, mask_id)
        algo = config.algo
        self.curriculum = noise_schedule.GaussianCurriculum(algo.gamma_min, algo.gamma_max, vocab_size)
        self.T, self.every = int(algo.T), int(algo.update_teacher_every)
        if self.T < 1:
            raise ValueError(f"algo.T={algo.T} must be >= 1 (e.g. algo.T=512)")
        if self.every < 1:
            raise ValueError(f"algo.update_teacher_every={algo.update_teacher_every} must be >= 1 "
                             f"(e.g. algo.update_teacher_every=10000)")
        self.teacher_ema = bool(algo.teacher_ema)
        self.linear_growth = bool(algo.linear_growth_dt)
        self.growth_min, self.growth_max = float(algo.linear_growth_min), float(algo.linear_growth_max)
        if self.linear_growth and not 0 < self.growth_min <= self.growth_max <= 1:
            raise ValueError(f"algo.linear_growth_min={algo.linear_growth_min} and algo.linear_growth_max="
                             f"{algo.linear_growth_max} must satisfy 0 < min <= max <= 1 "
                             f"(e.g. algo.linear_growth_min=0.001 algo.linear_growth_max=0.25)")
        if algo.loss_type not in ('kl-bwd', 'kl-fwd'):
            raise ValueError(f"algo.loss_type={algo.loss_type!r} is unknown; use kl-bwd or kl-fwd (e.g. algo.loss_type=kl-bwd)")
        self.loss_type = algo.loss_type
        self.max_steps = int(config.trainer.max_steps)

    def round(self, step):
        """Distillation round of an optimizer step: the teacher is refreshed when it changes."""
        return step // self.every

    def delta(self, step):
        """Distillation step size: 2^round / T, or linear growth from min to max over trainer.max_steps."""
        if self.linear_growth:
            frac = min(step / max(self.max_steps, 1), 1.0)
            return self.growth_min + frac * (self.growth_max - self.growth_min)
        return min(2 ** self.round(step) / self.T, 1.0)

    def loss(self, module, x0, attention_mask, t, step):
        dt = self.delta(step)
        t = (t + dt).clamp(0, 1)
        s = t - dt
        g = self.curriculum
        zt, zs = latents.shared_noise_latents(x0, g.gamma(t), g.gamma(s), self.vocab_size)
        alpha_t, alpha_s = g.alpha(t)[:, None], g.alpha(s)[:, None]
        student = module.backbone(zt, self.sigma(alpha_t), attention_mask=attention_mask)
        with torch.no_grad():
            teacher = module.teacher(zs, self.sigma(alpha_s), attention_mask=attention_mask)
        return losses.distillation_kl(student, teacher, self.loss_type), attention_mask

    def eval_loss(self, module, x0, attention_mask, t, step):
        return DUOBase.loss(self, module, x0, attention_mask, t, step)


ALGORITHMS = {'ar': AR, 'mdlm': MDLM, 'duo_base': DUOBase, 'duo': DUO, 'distillation': Distillation}


def make_backbone(config, vocab_size, causal):
    m = config.model
    backbone = DiT(vocab_size=vocab_size, hidden_size=m.hidden_size, cond_dim=m.cond_dim, n_blocks=m.n_blocks,
                   n_heads=m.n_heads, max_length=m.length, dropout=m.dropout, causal=causal,
                   attn_backend=m.attn_backend)
    if m.get('compile', False):
        reason = runtime.compile_unsupported(config.trainer.get('accelerator', 'auto'))
        if reason:
            log.warning('model.compile=true ignored: %s', reason)
        else:
            # The transformer blocks, where compilation fuses the normalisations, modulations,
            # rotary embedding and gates; in place, so the state dict keeps its keys.
            for block in backbone.blocks:
                block.compile()
    return backbone


class Diffusion(L.LightningModule):
    """Training, evaluation and sampling of one algorithm with a DiT backbone."""

    def __init__(self, config, vocab_size: int, mask_id: int, bos_id: int):
        super().__init__()
        if config.algo.name not in ALGORITHMS:
            raise ValueError(f"algo={config.algo.name!r} is unknown; use one of {sorted(ALGORITHMS)} (e.g. algo=duo_base)")
        self.config = config
        self.vocab_size, self.mask_id, self.bos_id = vocab_size, mask_id, bos_id
        self.algo = ALGORITHMS[config.algo.name](config, vocab_size, mask_id)
        runtime.allow_tf32()
        self.backbone = make_backbone(config, vocab_size, self.algo.causal)
        self.ema = EMA(self.backbone.parameters(), config.training.ema) if config.training.ema > 0 else None
        if isinstance(self.algo, Distillation) and self.algo.teacher_ema and self.ema is None:
            raise ValueError(f"algo.teacher_ema=true needs an EMA of the student but training.ema={config.training.ema}: "
                             f"set training.ema (e.g. training.ema=0.999) or algo.teacher_ema=false")
        # Distillation's teacher: deliberately not a registered submodule, so that it is neither in
        # state_dict (on_save_checkpoint stores it once, and only when a resume needs it), nor
        # optimised, nor switched to train mode by Lightning.
        self._teacher = None
        self._teacher_round = -1  # the round whose snapshot the teacher holds; -1: none yet
        self.micro_step = 0   # training batches seen; seeds the noise so that resumes are exact
        self.nonfinite_steps = 0        # optimizer steps skipped for non-finite loss or gradients ...
        self.nonfinite_in_a_row = 0     # ... and how many of the latest in a row
        self._loss_finite = None        # all losses of the current accumulation window finite (tensor)
        self._step_skipped = False
        self.stop_validation = False    # set when the run is stopping (callbacks.GracefulStop)
        self._curriculum_over_logged = False
        self.valid_metric = NLLMetric()

    # ---- helpers -------------------------------------------------------------------------
    @property
    def compute_dtype(self):
        precision = self.trainer.precision if self._trainer is not None else '32'
        return runtime.precision_dtype(precision) or torch.float32

    # ---- distillation teacher ------------------------------------------------------------
    @property
    def teacher(self):
        return self._teacher

    def _ensure_teacher(self):
        """The teacher module (created on first use as a frozen, eval-mode copy of the backbone), on
        the backbone's device and dtype: Lightning moves only registered modules."""
        if self._teacher is None:
            object.__setattr__(self, '_teacher', copy.deepcopy(self.backbone).requires_grad_(False).eval())
        ref = next(self.backbone.parameters())
        if next(self._teacher.parameters()).device != ref.device or next(self._teacher.parameters()).dtype != ref.dtype:
            self._teacher.to(device=ref.device, dtype=ref.dtype)
        return self._teacher

    @torch.no_grad()
    def refresh_teacher(self, distill_round):
        """Teacher <- the student's current weights (or its EMA with algo.teacher_ema=true)."""
        teacher = self._ensure_teacher()
        source = self.ema.shadow_params if self.algo.teacher_ema else list(self.backbone.parameters())
        for dst, src in zip(teacher.parameters(), source):
            dst.copy_(src)
        self._teacher_round = distill_round

    def _times(self, batch_size):
        rank, world = runtime.rank_world()
        return noise_schedule.stratified_times(batch_size, self.config.training.sampling_eps, rank, world,
                                               device=self.device)

    def _loss(self, batch, step, train=True):
        x0, mask = batch['input_ids'], batch['attention_mask']
        loss_fn = self.algo.loss if train else self.algo.eval_loss
        per_token, weight = loss_fn(self, x0, mask, self._times(x0.shape[0]), step)
        return per_token, weight.to(per_token.dtype)

    # ---- training ------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        # One seed per (run seed, micro-batch, rank): the noise and dropout of every step are a
        # pure function of its position, so a resumed run draws exactly what it would have drawn.
        rank, world = runtime.rank_world()
        torch.manual_seed((self.config.seed * 1_000_003 + self.micro_step * world + rank) % 2**63)
        if isinstance(self.algo, Distillation):
            distill_round = self.algo.round(self.global_step)
            if distill_round != self._teacher_round:
                self.refresh_teacher(distill_round)
                log.info('Distillation round %d from step %d: teacher refreshed, delta = %.6g', distill_round,
                         self.global_step, self.algo.delta(self.global_step))
            self._ensure_teacher()

    def training_step(self, batch, batch_idx):
        per_token, weight = self._loss(batch, self.global_step)
        loss = (per_token * weight).sum() / weight.sum()
        finite = torch.isfinite(loss.detach())  # read at the optimizer step: no sync per batch
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.micro_step += 1
        self.log('train/loss', loss.detach(), prog_bar=True, sync_dist=False)
        if isinstance(self.algo, DUO):
            # Logged at every step (Lightning would otherwise repeat the last value): after the
            # curriculum, 0, the limit tau -> 0 in which softmax(w / tau) is the one-hot z_t.
            in_curriculum = self.algo.in_curriculum(self.global_step)
            self.log('train/tau', self.algo.tau(self.global_step) if in_curriculum else 0.0)
            if not in_curriculum and not self._curriculum_over_logged:
                log.info('Curriculum over (step %d >= algo.curriculum_end=%d): training with the exact DUO-base loss',
                         self.global_step, self.algo.end)
                self._curriculum_over_logged = True
        if isinstance(self.algo, Distillation):
            self.log('train/delta', self.algo.delta(self.global_step))
        return loss

    def on_before_optimizer_step(self, optimizer):
        """Skip the step when the loss or the (unscaled) gradients are not finite: no parameter,
        optimizer-state or EMA update (fp16 loss scaling then lowers its scale); stop after
        `training.max_nonfinite_steps` such steps in a row."""
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.tensor(True)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(finite.device)
        loss_finite, self._loss_finite = self._loss_finite, None
        finite = bool(finite)
        if self.trainer.world_size > 1:  # FSDP shards the gradients: decide together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._step_skipped = not finite
        if finite:
            self.nonfinite_in_a_row = 0
            return
        for p in self.backbone.parameters():
            p.grad = None  # AdamW leaves parameters without gradients (and their state) untouched
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        what = 'loss' if loss_finite is not None and not bool(loss_finite) else 'gradients'
        limit = int(self.config.training.max_nonfinite_steps)
        if self.nonfinite_in_a_row >= limit:
            raise RunStopped(
                f"non-finite loss or gradients in {self.nonfinite_in_a_row} optimizer steps in a row (up to step "
                f"{self.global_step}, training.max_nonfinite_steps={limit}): training stopped without saving; the last "
                f"good checkpoint is kept. Lower optim.lr, use trainer.precision=bf16 or 32, or check the data")
        log.warning('Step %d: non-finite %s, step skipped (%d skipped so far, %d in a row; the run stops at %d in a row)',
                    self.global_step, what, self.nonfinite_steps, self.nonfinite_in_a_row, limit)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self._step_skipped = False
        optimizer.step(closure=optimizer_closure)
        # The EMA follows every applied step, right after it (a checkpoint then holds both).
        if self.ema is not None and not self._step_skipped:
            self.ema.update(self.backbone.parameters())

    def configure_optimizers(self):
        o = self.config.optim
        optimizer = torch.optim.AdamW(self.backbone.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.config))
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}

    # ---- validation ----------------------------------------------------------------------
    def on_validation_epoch_start(self):
        torch.manual_seed(self.config.seed)  # the same noise for every evaluation
        self.valid_metric.reset()
        self._ema_ctx = None
        if self.ema is not None and not self.config.eval.disable_ema:
            self._ema_ctx = self.ema.applied(self.backbone.parameters())
            self._ema_ctx.__enter__()

    def validation_step(self, batch, batch_idx):
        if self.stop_validation:
            return
        per_token, weight = self._loss(batch, self.global_step, train=False)
        self.valid_metric.update(per_token * weight, weight)

    def on_validation_epoch_end(self):
        if self._ema_ctx is not None:
            self._ema_ctx.__exit__(None, None, None)
            self._ema_ctx = None
        if self.stop_validation:  # interrupted: no partial metrics
            return
        nll, ppl, bpd, tokens = self.valid_metric.compute()  # already summed over ranks
        # sync_dist averages values that are equal on every rank: a no-op that keeps Lightning quiet.
        self.log_dict({'val/nll': nll, 'val/ppl': ppl, 'val/bpd': bpd, 'val/tokens': float(tokens)}, sync_dist=True)

    # ---- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch_size, length=None, generator=None, progress=False):
        """Samples (batch_size, length) int64 from the model (EMA weights are the caller's choice)."""
        return self.algo.sample(self, batch_size, length or self.config.model.length, self.config,
                                generator=generator, progress=progress)

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        if self.ema is not None:
            checkpoint['ema'] = self.ema.state_dict()
        checkpoint['micro_step'] = self.micro_step
        checkpoint['model_config'] = OmegaConf.to_container(self.config.model, resolve=True)
        # The teacher is a snapshot of the student (or EMA) at its round's first step, stored nowhere
        # else. A checkpoint at a round boundary does not need it: the resumed run takes a fresh
        # snapshot at its first step, exactly as the uninterrupted run does.
        if self._teacher is not None and isinstance(self.algo, Distillation) \
                and self.algo.round(self.global_step) == self._teacher_round:
            checkpoint['teacher'] = {'round': self._teacher_round, 'state_dict': self._teacher.state_dict()}

    def on_load_checkpoint(self, checkpoint):
        if self.ema is not None and 'ema' in checkpoint:
            self.ema.load_state_dict(checkpoint['ema'])
        self.micro_step = checkpoint.get('micro_step', 0)
        if isinstance(self.algo, Distillation):
            self._teacher_round = -1  # no stored teacher: the first training step takes a new snapshot
            if 'teacher' in checkpoint:
                self._ensure_teacher().load_state_dict(checkpoint['teacher']['state_dict'])
                self._teacher_round = checkpoint['teacher']['round']

    def on_fit_start(self):
        if self.ema is not None:
            self.ema.to(self.device)
        if self._teacher is not None:
            self._ensure_teacher()


def lr_lambda(config):
    """Learning-rate multiplier per optimizer step: linear warmup, then constant or cosine decay."""
    sched = config.lr_scheduler
    warmup = max(int(sched.num_warmup_steps), 0)
    if sched.name == 'constant_warmup':
        return lambda step: min(1.0, (step + 1) / (warmup + 1))
    if sched.name == 'cosine_decay_warmup':
        total = max(int(config.trainer.max_steps) - warmup, 1)
        floor = sched.min_lr / config.optim.lr

        def cosine(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / total, 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return cosine
    raise ValueError(f"lr_scheduler={sched.name!r} is unknown; use constant_warmup or cosine_decay_warmup")
