"""The Lightning module: one algorithm (algorithms.py) with a DiT backbone, its EMA, and the step API.

The step API is the one way a training step runs, inside Lightning or not:
- `train_step(batch, step)`: seeding and the algorithm's per-batch hook (`begin_batch`), the loss
  (B, L) -> scalar, the finite-loss bookkeeping;
- `apply_step()`: whether the optimizer step may be applied (non-finite loss or gradients skip it,
  and stop the run after `training.max_nonfinite_steps` in a row);
- `after_optimizer_step()`: the EMA update.
Lightning's hooks call them; `StepRunner` calls them with the same optimizer, scheduler, clipping
and loss scaling for code that runs steps itself (the GPU probe, the setup check, the benchmarks).
"""
import logging
import math
import time

import lightning as L
import torch
import torchmetrics
from omegaconf import OmegaConf

import algorithms
import runtime
from ema import EMA
from errors import RunStopped
from models.dit import DiT

log = logging.getLogger(__name__)


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


class NLLMetric(torchmetrics.Metric):
    """Token-weighted mean of per-token losses, summed across batches and DDP ranks in float64."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state('total', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')

    def update(self, weighted_losses: torch.Tensor, weights: torch.Tensor):
        """weighted_losses, weights (B, L): per-token loss times its weight (0 at excluded positions)."""
        self.total += weighted_losses.double().sum()
        self.count += weights.double().sum()

    def compute(self) -> tuple[float, float, float, int]:
        """(nll, ppl, bpd, tokens) over everything seen since the last reset."""
        count = self.count.item()
        nll = self.total.item() / count if count else float('nan')
        ppl = math.exp(nll) if nll < 700 else float('inf')
        return nll, ppl, nll / math.log(2), int(round(count))


class Diffusion(L.LightningModule):
    """Training, evaluation and sampling of one algorithm with a DiT backbone."""

    def __init__(self, config, vocab_size: int, mask_id: int, bos_id: int):
        super().__init__()
        self.config = config
        self.vocab_size, self.mask_id, self.bos_id = vocab_size, mask_id, bos_id
        self.algo = algorithms.build(config, vocab_size, mask_id)
        runtime.allow_tf32()
        self.backbone = make_backbone(config, vocab_size, self.algo.causal)
        self.ema = EMA(self.backbone.parameters(), config.training.ema) if config.training.ema > 0 else None
        self.algo.check(self)
        self.micro_step = 0   # training batches seen; seeds the noise so that resumes are exact
        self.nonfinite_steps = 0        # optimizer steps skipped for non-finite loss or gradients ...
        self.nonfinite_in_a_row = 0     # ... and how many of the latest in a row
        self._loss_finite = None        # all losses of the current accumulation window finite (tensor)
        self._step_skipped = False
        self.stop_validation = False    # set when the run is stopping (callbacks.GracefulStop)
        self.valid_metric = NLLMetric()

    @property
    def compute_dtype(self):
        precision = self.trainer.precision if self._trainer is not None else self.config.trainer.precision
        return runtime.precision_dtype(precision) or torch.float32

    def _times(self, batch_size):
        return self.algo.times(self, batch_size)

    def _loss(self, batch, step, train=True):
        x0, mask = batch['input_ids'], batch['attention_mask']
        loss_fn = self.algo.loss if train else self.algo.eval_loss
        per_token, weight = loss_fn(self, x0, mask, self._times(x0.shape[0]), step)
        return per_token, weight.to(per_token.dtype)

    # ---- the step API --------------------------------------------------------------------
    def begin_batch(self, step: int):
        """Seed this micro-batch and run the algorithm's per-batch hook for optimizer step `step`."""
        # One seed per (run seed, micro-batch, rank): the noise and dropout of every step are a
        # pure function of its position, so a resumed run draws exactly what it would have drawn.
        rank, world = runtime.rank_world()
        torch.manual_seed((self.config.seed * 1_000_003 + self.micro_step * world + rank) % 2**63)
        self.micro_step += 1
        self.algo.before_batch(self, step)

    def train_step(self, batch, step: int) -> torch.Tensor:
        """The mean loss of one training micro-batch of optimizer step `step`."""
        self.begin_batch(step)
        per_token, weight = self._loss(batch, step)
        loss = (per_token * weight).sum() / weight.sum()
        finite = torch.isfinite(loss.detach())  # read at the optimizer step: no sync per batch
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        return loss

    def apply_step(self) -> bool:
        """Whether the optimizer step may be applied: False when the loss or the (unscaled) gradients
        are not finite, after clearing the gradients (no parameter, optimizer-state or EMA update;
        fp16 loss scaling then lowers its scale). Stops the run after `training.max_nonfinite_steps`
        such steps in a row."""
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        finite = torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads else torch.tensor(True)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(finite.device)
        loss_finite, self._loss_finite = self._loss_finite, None
        finite = bool(finite)
        if self._trainer is not None and self.trainer.world_size > 1:  # FSDP shards the gradients: decide together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._step_skipped = not finite
        if finite:
            self.nonfinite_in_a_row = 0
            return True
        for p in self.backbone.parameters():
            p.grad = None  # AdamW leaves parameters without gradients (and their state) untouched
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        what = 'loss' if loss_finite is not None and not bool(loss_finite) else 'gradients'
        limit = int(self.config.training.max_nonfinite_steps)
        step = self.global_step if self._trainer is not None else '?'
        if self.nonfinite_in_a_row >= limit:
            raise RunStopped(
                f"non-finite loss or gradients in {self.nonfinite_in_a_row} optimizer steps in a row (up to step "
                f"{step}, training.max_nonfinite_steps={limit}): training stopped without saving; the last "
                f"good checkpoint is kept. Lower optim.lr, use trainer.precision=bf16 or 32, or check the data")
        log.warning('Step %s: non-finite %s, step skipped (%d skipped so far, %d in a row; the run stops at %d in a row)',
                    step, what, self.nonfinite_steps, self.nonfinite_in_a_row, limit)
        return False

    def after_optimizer_step(self):
        """The EMA follows every applied step, right after it (a checkpoint then holds both)."""
        if self.ema is not None and not self._step_skipped:
            self.ema.update(self.backbone.parameters())

    # ---- Lightning's hooks ---------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.train_step(batch, self.global_step)
        self.log('train/loss', loss.detach(), prog_bar=True, sync_dist=False)
        for name, value in self.algo.log_values(self.global_step).items():
            self.log(name, value)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.apply_step()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self._step_skipped = False
        optimizer.step(closure=optimizer_closure)
        self.after_optimizer_step()

    def configure_optimizers(self):
        o = self.config.optim
        optimizer = torch.optim.AdamW(self.backbone.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.config))
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}

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

    def on_save_checkpoint(self, checkpoint):
        """The module's state beyond its weights: EMA, data position, what rebuilds it, the algorithm's extras."""
        if self.ema is not None:
            checkpoint['ema'] = self.ema.state_dict()
        checkpoint['micro_step'] = self.micro_step
        checkpoint['duo'] = self.description()
        self.algo.save_extras(checkpoint, self.global_step)

    def description(self) -> dict:
        """What rebuilds this model, stored as checkpoint['duo'] (checkpoints.read_source reads it)."""
        container = lambda node: OmegaConf.to_container(node, resolve=True)
        c = self.config
        return {'version': 1, 'algo': container(c.algo), 'model': container(c.model), 'noise': container(c.noise),
                'data': container(c.data), 'tokenizer': str(c.data.tokenizer_name_or_path),
                'vocab_size': self.vocab_size, 'mask_id': self.mask_id, 'bos_id': self.bos_id}

    def on_load_checkpoint(self, checkpoint):
        if self.ema is not None and 'ema' in checkpoint:
            self.ema.load_state_dict(checkpoint['ema'])
        self.micro_step = checkpoint.get('micro_step', 0)
        self.algo.load_extras(self, checkpoint)

    def on_fit_start(self):
        if self.ema is not None:
            self.ema.to(self.device)

    # ---- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch_size, length=None, generator=None, progress=False, fixed=None):
        """Samples (batch_size, length) int64 from the model (EMA weights are the caller's choice);
        fixed = (mask (B, L) bool, tokens (B, L)): positions held at those tokens (prompts, infilling)."""
        return self.algo.sample(self, batch_size, length or self.config.model.length,
                                generator=generator, progress=progress, fixed=fixed)


class StepRunner:
    """Optimizer steps outside Lightning, as the Trainer runs them: the step API with the module's
    own optimizer and learning-rate schedule (configure_optimizers), autocast in the run's precision,
    fp16 loss scaling, gradient clipping (optim.grad_clip) and the non-finite skip.

    `loss_fn(batch, step) -> scalar` and `ema_update()` replace the module's train_step and EMA update
    (bench/bench_train.py's upstream-style reference runs through the same loop).
    """

    def __init__(self, module: Diffusion, precision=None, loss_fn=None, ema_update=None, optimizer=None):
        self.module = module
        self.precision = precision or module.config.trainer.precision
        if optimizer is None:
            setup = module.configure_optimizers()
            self.optimizer, self.scheduler = setup['optimizer'], setup['lr_scheduler']['scheduler']
        else:
            self.optimizer = optimizer
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(module.config))
        self.device_type = next(module.backbone.parameters()).device.type
        fp16 = runtime.precision_dtype(self.precision) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type) if fp16 else None
        self.loss_fn, self.ema_update = loss_fn or module.train_step, ema_update or module.after_optimizer_step
        self.step_count = 0
        if module.ema is not None:
            module.ema.to(next(module.backbone.parameters()).device)

    def step(self, batches, sync=lambda: None) -> dict:
        """One optimizer step over the micro-batches `batches` (one batch dict or a list: gradient
        accumulation). Returns {'loss', 'applied', 'forward_s', 'backward_s', 'optimizer_s'}; `sync`
        (e.g. torch.cuda.synchronize) is called before each clock reading."""
        batches = batches if isinstance(batches, list) else [batches]
        times = {'forward_s': 0.0, 'backward_s': 0.0}
        total = 0.0
        for batch in batches:
            sync()
            start = time.perf_counter()
            with runtime.autocast(self.device_type, self.precision):
                loss = self.loss_fn(batch, self.step_count) / len(batches)
            sync()
            mark = time.perf_counter()
            times['forward_s'] += mark - start
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            sync()
            times['backward_s'] += time.perf_counter() - mark
            total += float(loss.detach())
        mark = time.perf_counter()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        applied = self.module.apply_step()
        clip = self.module.config.optim.grad_clip
        if applied and clip:
            torch.nn.utils.clip_grad_norm_(self.module.backbone.parameters(), clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        self.ema_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        sync()
        times['optimizer_s'] = time.perf_counter() - mark
        return {'loss': total, 'applied': applied, **times}


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
