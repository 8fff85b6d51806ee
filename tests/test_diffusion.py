"""diffusion.py: the step API, the EMA weights that validation measures, per-rank noise.

Each test computes what the module should produce independently (a module built with the weights
it must use, the formula of the EMA, the seeds of the ranks) and compares.
"""
import copy

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

import runtime
from conftest import ROOT
from diffusion import Diffusion, StepRunner

pytestmark = [pytest.mark.filterwarnings('ignore:.*isinstance\\(treespec, LeafSpec\\)'),
              pytest.mark.filterwarnings('ignore:.*does not have many workers')]

K, MASK = 35, 4
TINY = ['model=micro', 'model.length=16', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16', 'trainer.accelerator=cpu', 'trainer.precision=32', 'training.ema=0.9']


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=[*TINY, *overrides])


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def batches(n=3, B=4, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{'input_ids': torch.randint(8, K, (B, L), generator=g), 'attention_mask': torch.ones(B, L, dtype=torch.long)}
            for _ in range(n)]


def validate(module, data):
    trainer = L.Trainer(accelerator='cpu', logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(data, batch_size=None)  # the batches as they are
    return trainer.validate(module, loader, verbose=False)[0]['val/nll']


@pytest.mark.parametrize('algo', ['duo_base', 'mdlm'])
def test_validation_measures_the_ema_weights(algo):
    """The bound validation reports is that of the EMA weights (SPEC §8), computed here by a module
    whose own weights are the EMA's; eval.disable_ema=true measures the raw weights instead."""
    config = make_config(f'algo={algo}')
    module = Diffusion(config, K, MASK, 2)
    randomize(module.backbone, 0)
    module.ema.shadow_params = [p.detach() * 0.5 + 0.1 for p in module.backbone.parameters()]
    raw = [p.detach().clone() for p in module.backbone.parameters()]
    data = batches()
    as_ema = Diffusion(config, K, MASK, 2)
    as_ema.ema = None
    with torch.no_grad():
        for p, s in zip(as_ema.backbone.parameters(), module.ema.shadow_params):
            p.copy_(s)
    nll = validate(module, data)
    assert nll == pytest.approx(validate(as_ema, data), rel=1e-6)
    assert all(torch.equal(p, r) for p, r in zip(module.backbone.parameters(), raw))  # swapped back after
    config.eval.disable_ema = True
    as_raw = copy.deepcopy(as_ema)
    with torch.no_grad():
        for p, r in zip(as_raw.backbone.parameters(), raw):
            p.copy_(r)
    assert validate(module, data) == pytest.approx(validate(as_raw, data), rel=1e-6)
    assert abs(validate(as_raw, data) - nll) > 1e-3  # the two weights are told apart


def test_the_step_api_applies_adamw_and_the_ema_formula():
    """StepRunner (what the GPU probe, the setup check and the benchmarks use) steps like training:
    AdamW on the loss's gradient, then shadow <- shadow - (1 - d)(shadow - theta), d = min(decay, (1 + n)/(10 + n))."""
    config = make_config('algo=duo_base', 'optim.grad_clip=0', 'lr_scheduler.num_warmup_steps=0')
    module = Diffusion(config, K, MASK, 2)
    randomize(module.backbone, 1)
    module.ema.shadow_params = [p.detach().clone() for p in module.backbone.parameters()]
    reference = copy.deepcopy(module.backbone)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    shadow = [p.detach().clone() for p in reference.parameters()]
    runner = StepRunner(module)
    for n, batch in enumerate(batches(2), start=1):
        micro = module.micro_step
        loss = runner.step(batch)['loss']
        # the same loss by hand: the module's seeding of this micro-batch, then its loss with the reference's weights
        probe = Diffusion(config, K, MASK, 2)
        probe.backbone = reference
        probe.micro_step = micro
        expected = probe.train_step(batch, n - 1)
        assert loss == pytest.approx(float(expected), rel=1e-6)
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        d = min(0.9, (1 + n) / (10 + n))
        shadow = [s - (1 - d) * (s - p.detach()) for s, p in zip(shadow, reference.parameters())]
    for mine, theirs in zip(module.backbone.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(module.ema.shadow_params, shadow):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_each_rank_draws_its_own_noise(monkeypatch):
    """Under DDP every rank seeds its micro-batch with its rank and draws its own stratum of times:
    the same batch gives different noise on rank 0 and rank 1, and a rank's draws do not depend on
    the run being resumed (the seed is a function of the micro-batch number)."""
    config = make_config('algo=duo_base')
    module = Diffusion(config, K, MASK, 2)
    batch = batches(1)[0]
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(runtime, 'rank_world', lambda r=rank: (r, 2))
        module.micro_step = 5
        module.begin_batch(0)
        times = module._times(4)
        draws[rank] = (times, module.algo.corrupt(batch['input_ids'], module.algo.schedule.alpha(times)[:, None]))
        # stratified times: rank r holds the strata [r B, (r + 1) B) of the 2 B global ones
        assert ((times - 1e-3) / (1 - 1e-3) * 8).floor().tolist() == [4 * rank + k for k in range(4)]
    assert not torch.equal(draws[0][1], draws[1][1])
    monkeypatch.setattr(runtime, 'rank_world', lambda: (1, 2))
    module.micro_step = 5
    module.begin_batch(0)
    assert torch.equal(module._times(4), draws[1][0])  # the same (seed, micro-batch, rank): the same draw
