"""DUO curriculum and Discrete Consistency Distillation as trained (SPEC §5): the teacher's refresh
schedule, the step size the loss uses, what validation reports, checkpoints and exact resumes,
fine-tuning starts, the recipe config, and end-to-end runs through main.py.

The maths of the pieces (duality operator, latents, losses) is tested in test_duality.py and
test_losses.py; here the training machinery around them is.
"""
import copy
import json
import math
import types

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

import algorithms
import checkpoints
import diffusion
import errors
import latents
import losses
import main
import noise_schedule as ns
from conftest import ROOT

# In-process fits have no validation loader, and resume mid-epoch from an index-free dataset.
pytestmark = [pytest.mark.filterwarnings('ignore:You defined a `validation_step` but have no `val_dataloader`'),
              pytest.mark.filterwarnings('ignore:You.re resuming from a checkpoint that ended before the epoch ended'),
              pytest.mark.filterwarnings('ignore:.*isinstance\\(treespec, LeafSpec\\)')]

K = 35  # the text8 tokenizer's vocabulary (mask id 4)
MASK = 4
TINY = ['model=micro', 'model.length=8', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16', 'lr_scheduler.num_warmup_steps=0', 'optim.lr=1e-2']


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=list(overrides))


def distill_config(*overrides):
    return make_config('algo=distillation', *TINY, 'algo.update_teacher_every=3', 'algo.T=8', 'training.ema=0.9',
                       *overrides)


def new_model(config, seed=0):
    """A Diffusion module with random weights (a zero-initialised DiT predicts uniform logits, which a
    teacher copy matches exactly: the distillation gradient would be zero), EMA starting there."""
    model = diffusion.Diffusion(config, K, MASK, bos_id=2)
    randomize(model.backbone, seed)
    if model.ema is not None:
        model.ema.shadow_params = [p.detach().clone() for p in model.backbone.parameters()]
    return model


def randomize(module, seed=0):
    """Random weights everywhere (the DiT's output layers start at zero, which makes every logit 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


class SameBatch(torch.utils.data.Dataset):
    """Every index is the same batch: data order cannot matter, so resumed and straight runs match."""

    def __init__(self, batch_size=4, length=8, n=1000):
        g = torch.Generator().manual_seed(1)
        self.batch = {'input_ids': torch.randint(8, K, (batch_size, length), generator=g),
                      'attention_mask': torch.ones(batch_size, length, dtype=torch.long)}
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def fit(model, max_steps, accumulate=1, ckpt_path=None):
    trainer = L.Trainer(accelerator='cpu', devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(SameBatch(), batch_size=None)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


def flat(params):
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


# ---------------------------------------------------------------------------------------------
# teacher refresh schedule
@pytest.mark.parametrize('teacher_ema,accumulate', [(False, 1), (True, 2)])
def test_teacher_is_refreshed_exactly_at_round_boundaries(teacher_ema, accumulate):
    every, steps = 3, 8
    config = distill_config(f'algo.teacher_ema={str(teacher_ema).lower()}', f'algo.update_teacher_every={every}')
    model = new_model(config)
    records = []
    original = model.algo.loss

    def spy(module, x0, mask, t, step):
        teacher = module.algo.teacher
        records.append({'step': step, 'student': flat(module.backbone.parameters()),
                        'ema': flat(module.ema.shadow_params), 'teacher': flat(teacher.parameters()),
                        'frozen': not any(p.requires_grad for p in teacher.parameters()),
                        'eval_mode': not teacher.training})
        return original(module, x0, mask, t, step)

    model.algo.loss = spy
    trainer = fit(model, steps, accumulate)
    assert [r['step'] for r in records] == [s for s in range(steps) for _ in range(accumulate)]
    first = {}  # the first micro-batch of every optimizer step
    for r in records:
        first.setdefault(r['step'], r)
    source = 'ema' if teacher_ema else 'student'
    for r in records:
        start = first[every * (r['step'] // every)]
        assert torch.equal(r['teacher'], start[source]), r['step']  # the snapshot taken at the round's start
        assert r['frozen'] and r['eval_mode']
    for step in range(1, steps):
        changed = not torch.equal(first[step]['teacher'], first[step - 1]['teacher'])
        assert changed == (step % every == 0), step
        assert not torch.equal(first[step]['student'], first[step - 1]['student'])  # the student does move
    # the teacher is not part of the module: neither saved in state_dict nor optimised
    assert all(k.startswith('backbone.') for k in model.state_dict())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group['params']}
    assert optimised == {id(p) for p in model.backbone.parameters()}
    assert not optimised & {id(p) for p in model.algo.teacher.parameters()}


# ---------------------------------------------------------------------------------------------
# the step size the loss uses
class Recorder:
    """A stand-in network: records its inputs and returns fixed logits."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma=None, attention_mask=None):
        self.calls.append((x, sigma))
        return torch.zeros(*x.shape, K)


@pytest.mark.parametrize('linear_growth', [False, True])
def test_loss_uses_the_scheduled_step_size(linear_growth):
    config = distill_config('algo.update_teacher_every=100', 'algo.T=64', 'trainer.max_steps=1000',
                            f'algo.linear_growth_dt={str(linear_growth).lower()}', 'algo.linear_growth_min=0.01',
                            'algo.linear_growth_max=0.3', 'algo.gamma_min=-2.5', 'algo.gamma_max=1.5')
    algo = algorithms.Distillation(config, K, MASK)
    t = torch.tensor([0.0, 0.3, 0.7, 0.99])
    x0 = torch.randint(8, K, (4, 6))
    for step in (0, 99, 100, 250, 399, 500, 1200):
        expected = (0.01 + min(step / 1000, 1) * 0.29) if linear_growth else min(2 ** (step // 100) / 64, 1)
        module = types.SimpleNamespace(backbone=Recorder())
        algo.teacher = Recorder()
        per_token, weight = algo.loss(module, x0, torch.ones_like(x0), t, step)
        assert per_token.shape == (4, 6) and torch.equal(per_token, torch.zeros(4, 6))
        t_student = (t + expected).clamp(0, 1)
        t_teacher = t_student - expected
        for net, times in ((module.backbone, t_student), (algo.teacher, t_teacher)):
            (z, sigma), = net.calls
            assert z.dtype == torch.int64 and z.shape == x0.shape
            alpha = ns.gaussian_to_uniform_alpha((-2.5 + 4.0 * times).double(), K)
            torch.testing.assert_close(sigma.double(), -torch.log(alpha), rtol=1e-5, atol=1e-6)


def test_distillation_loss_is_zero_for_identical_teacher_and_vanishing_step():
    torch.manual_seed(0)
    x0 = torch.randint(8, K, (16, 8))
    t = ns.stratified_times(16, 1e-3)
    student = randomize(diffusion.make_backbone(distill_config(), K, causal=False))
    same = copy.deepcopy(student)
    other = randomize(copy.deepcopy(student), seed=1)
    for loss_type in ('kl-bwd', 'kl-fwd'):
        def loss(teacher, T):
            algo = algorithms.Distillation(distill_config(f'algo.T={T}', f'algo.loss_type={loss_type}'), K, MASK)
            algo.teacher = teacher
            module = types.SimpleNamespace(backbone=student)
            torch.manual_seed(1)
            return algo.loss(module, x0, torch.ones_like(x0), t, step=0)[0]
        # delta = 2^-40: z_s = z_t and sigma_s = sigma_t to float precision
        assert loss(same, 2 ** 40).abs().max() < 1e-9
        assert (loss(other, 2 ** 40) > 1e-4).all()  # another teacher
        bigger_step = loss(same, 2)  # delta = 1/2: the teacher sees a cleaner z_s
        assert (bigger_step >= 0).all() and bigger_step.mean() > 1e-3


# ---------------------------------------------------------------------------------------------
# validation reports the exact DUO-base bound
@pytest.mark.parametrize('algo_name, extra', [('duo', []), ('duo', ['algo.curriculum.mode=poly9']),
                                               ('distillation', [])])
def test_validation_uses_the_exact_duo_base_loss(algo_name, extra):
    config = make_config(f'algo={algo_name}', *TINY, 'algo.gamma_min=-2.5', 'algo.gamma_max=1.5', *extra)
    backbone = randomize(diffusion.make_backbone(config, K, causal=False))
    module = types.SimpleNamespace(backbone=backbone)
    algo = algorithms.ALGORITHMS[algo_name](config, K, MASK)
    algo.teacher = copy.deepcopy(backbone)
    base = algorithms.DUOBase(config, K, MASK)
    x0 = torch.randint(8, K, (8, 8))
    t = ns.stratified_times(8, 1e-3)

    def run(fn):
        torch.manual_seed(5)
        return fn(module, x0, torch.ones_like(x0), t, 0)[0]
    exact = run(base.loss)
    assert torch.equal(run(algo.eval_loss), exact)
    assert not torch.allclose(run(algo.loss), exact)  # step 0: the curriculum / distillation loss


def test_tau_is_logged_during_the_curriculum_and_zero_after():
    config = make_config('algo=duo', *TINY, 'algo.curriculum_end=3', 'algo.gumbel_tau_log10_start=-1',
                         'algo.gumbel_tau_log10_end=-2', 'training.ema=0')
    model = diffusion.Diffusion(config, K, MASK, bos_id=2)
    logged = []
    model.log = lambda name, value, **kwargs: logged.append((model.global_step, name, value))
    fit(model, 5)
    tau = [(step, value) for step, name, value in logged if name == 'train/tau']
    assert [s for s, _ in tau] == [0, 1, 2, 3, 4]
    assert [v for _, v in tau[:3]] == pytest.approx([0.1, 10 ** (-1 - 1 / 3), 10 ** (-1 - 2 / 3)])
    assert [v for _, v in tau[3:]] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# the top-k curriculum (Duo++, SPEC-2 §14) as trained
class TopkRecorder:
    """A stand-in network for the curriculum: records its input and returns logits that depend on it
    (each slot's id row of a fixed table, weighted), or on the ids after the curriculum."""

    def __init__(self, seed=0):
        self.table = torch.randn(K, K, generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, x, sigma=None, attention_mask=None, weights=None):
        self.calls.append({'x': x, 'sigma': sigma, 'weights': weights})
        if weights is None:
            return self.table[x].clone()
        return (self.table[x] * weights[..., None]).sum(-2)


def test_a_topk_step_is_the_duo_loss_of_its_draw_at_the_fitted_operator():
    """mode=poly9 without top_k: the network gets the k = 2 ids and weights of latents.topk_relaxed_latent
    (same seed) and sigma = -log alpha_t of the fitted polynomial; the loss is losses.duo_loss at z_t =
    argmax of the latent with that alpha_t, alpha'_t. (The sums over the vocabulary are tested in
    test_duality.py against an enumeration.)"""
    gamma_min, gamma_max, tau_log10 = -2.65, 1.7, -2.0
    config = make_config('algo=duo', *TINY, 'algo.curriculum.mode=poly9', f'algo.curriculum.gamma_min={gamma_min}',
                         f'algo.gamma_max={gamma_max}', f'algo.curriculum.gumbel_tau_log10_start={tau_log10}',
                         f'algo.gumbel_tau_log10_end={tau_log10}')
    algo = algorithms.DUO(config, K, MASK)
    net = TopkRecorder()
    x0 = torch.randint(8, K, (4, 8), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    torch.manual_seed(11)
    per_token, weight = algo.loss(types.SimpleNamespace(backbone=net), x0, torch.ones_like(x0), t, step=0)
    (call,) = net.calls
    torch.manual_seed(11)
    gamma = gamma_min + t * (gamma_max - gamma_min)
    xt, ids, weights = latents.topk_relaxed_latent(x0, gamma, K, 10 ** tau_log10, 2)
    assert call['x'].shape == (4, 8, 2) and torch.equal(call['x'], ids) and torch.equal(call['weights'], weights)
    poly = ns.PolyCurriculum(gamma_min, gamma_max, K, degree=9)
    alpha, dalpha = poly.alpha(t)[:, None], poly.dalpha(t)[:, None]
    torch.testing.assert_close(call['sigma'], -torch.log(alpha[:, 0]))
    expected = losses.duo_loss((net.table[ids] * weights[..., None]).sum(-2), x0, xt, alpha, dalpha)
    torch.testing.assert_close(per_token, expected)
    assert torch.equal(weight, torch.ones_like(x0)) and (per_token >= 0).all()


def test_the_topk_curriculum_switches_to_the_exact_loss_at_curriculum_end():
    config = make_config('algo=duo', *TINY, 'algo.curriculum.mode=poly7', 'algo.curriculum.top_k=3',
                         'algo.curriculum.end=5', 'algo.gamma_min=-2.65', 'algo.gamma_max=1.7')
    algo = algorithms.DUO(config, K, MASK)
    base = algorithms.DUOBase(config, K, MASK)
    x0 = torch.randint(8, K, (4, 8), generator=torch.Generator().manual_seed(3))
    t = ns.stratified_times(4, 1e-3)

    def run(fn, step):
        net = TopkRecorder()
        torch.manual_seed(5)
        return fn(types.SimpleNamespace(backbone=net), x0, torch.ones_like(x0), t, step)[0], net.calls[0]
    for step in (0, 4):
        _, call = run(algo.loss, step)
        assert call['x'].shape == (4, 8, 3) and call['weights'].dtype == torch.float32
    for step in (5, 6, 1000):
        loss, call = run(algo.loss, step)
        assert call['weights'] is None and call['x'].shape == (4, 8)
        assert torch.equal(loss, run(base.loss, step)[0])
    assert algo.log_values(4)['train/tau'] == pytest.approx(1e-3) and algo.log_values(5)['train/tau'] == 0.0


def test_topk_curriculum_resumes_exactly_across_curriculum_end(tmp_path):
    """A straight 6-step run against one stopped after 3 (inside the curriculum, which ends at step 4) and
    resumed: the top-k draws come from the per-batch seed, so the weights and the EMA are bitwise equal."""
    config = make_config('algo=duo', *TINY, 'algo.curriculum.mode=poly9', 'algo.curriculum.top_k=3',
                         'algo.curriculum.end=4', 'algo.gamma_min=-2.65', 'algo.gamma_max=1.7', 'training.ema=0.9')
    straight = new_model(config)
    fit(straight, 6)
    first = new_model(config)
    trainer = fit(first, 3)
    path = tmp_path / 'stop3.ckpt'
    trainer.save_checkpoint(path)
    resumed = diffusion.Diffusion(config, K, MASK, bos_id=2)
    fit(resumed, 6, ckpt_path=str(path))
    assert torch.equal(flat(straight.backbone.parameters()), flat(resumed.backbone.parameters()))
    assert torch.equal(flat(straight.ema.shadow_params), flat(resumed.ema.shadow_params))


# ---------------------------------------------------------------------------------------------
# checkpoints and resumes
def test_resumed_distillation_restores_the_teacher_and_matches_a_straight_run(tmp_path):
    """A straight 8-step run against runs stopped after 4 steps (mid-round: the checkpoint must hold
    the teacher) and after 6 (a round boundary: it need not) and resumed. Data, noise, optimizer,
    EMA and teacher all resume, so the weights must be bitwise equal."""
    config = distill_config('algo.update_teacher_every=3', 'algo.teacher_ema=true')
    straight = new_model(config)
    fit(straight, 8)
    for stop, stores_teacher in ((4, True), (6, False)):
        first = new_model(config)
        trainer = fit(first, stop)
        path = tmp_path / f'stop{stop}.ckpt'
        trainer.save_checkpoint(path)
        checkpoint = torch.load(path, weights_only=False)
        assert all(k.startswith('backbone.') for k in checkpoint['state_dict'])  # no second copy of the teacher
        assert ('teacher' in checkpoint) == stores_teacher
        if stores_teacher:
            assert checkpoint['teacher']['round'] == 1
            saved = checkpoint['teacher']['state_dict']
            assert all(torch.equal(saved[k], v) for k, v in first.algo.teacher.state_dict().items())
            # the teacher is a snapshot from step 3, equal neither to the current student nor to the EMA
            assert not torch.equal(flat(saved[k] for k, _ in first.backbone.named_parameters()),
                                   flat(first.backbone.parameters()))
            loaded = diffusion.Diffusion(config, K, MASK, bos_id=2)
            loaded.on_load_checkpoint(checkpoint)
            assert all(torch.equal(loaded.algo.teacher.state_dict()[k], v) for k, v in saved.items())
            assert loaded.algo.teacher_round == 1
        resumed = diffusion.Diffusion(config, K, MASK, bos_id=2)
        fit(resumed, 8, ckpt_path=str(path))
        for (name, a), b in zip(straight.backbone.named_parameters(), resumed.backbone.parameters()):
            assert torch.equal(a, b), (stop, name)
        assert torch.equal(flat(straight.algo.teacher.parameters()), flat(resumed.algo.teacher.parameters()))
        assert torch.equal(flat(straight.ema.shadow_params), flat(resumed.ema.shadow_params))


# ---------------------------------------------------------------------------------------------
# configuration
def test_distillation_config_carries_the_paper_recipe():
    config = make_config('algo=distillation')
    assert config.algo.name == 'distillation'
    assert (config.algo.T, config.algo.update_teacher_every, config.algo.loss_type) == (512, 10_000, 'kl-bwd')
    assert config.trainer.max_steps == 5 * config.algo.update_teacher_every
    assert config.optim.lr == 6e-5 and config.training.ema == 0.999 and config.algo.teacher_ema is False
    overridden = make_config('algo=distillation', 'optim.lr=1e-4', 'training.ema=0.99', 'trainer.max_steps=7')
    assert (overridden.optim.lr, overridden.training.ema, overridden.trainer.max_steps) == (1e-4, 0.99, 7)
    # the other algorithms keep the global defaults
    duo = make_config('algo=duo')
    assert duo.optim.lr == 3e-4 and duo.training.ema == 0.9999 and duo.trainer.max_steps == 1_000_000


@pytest.mark.parametrize('override,message', [
    ('algo.T=0', r'^algo.T=0 must be >= 1 \(e.g. algo.T=512\)$'),
    ('algo.update_teacher_every=0', r'^algo.update_teacher_every=0 must be >= 1'),
    ('algo.loss_type=kl', r"^algo.loss_type='kl' is unknown"),
    ('algo.linear_growth_dt=true algo.linear_growth_min=0.5 algo.linear_growth_max=0.1',
     r'^algo.linear_growth_min=0.5 and algo.linear_growth_max=0.1 must satisfy'),
    ('algo.teacher_ema=true training.ema=0', r'^algo.teacher_ema=true needs an EMA of the student'),
    ('algo.gamma_min=1 algo.gamma_max=0', r'^algo.gamma_min must be < algo.gamma_max'),
])
def test_bad_distillation_settings_give_one_clear_line(override, message):
    with pytest.raises(ValueError, match=message):
        diffusion.Diffusion(distill_config(*override.split()), K, MASK, bos_id=2)


def test_bad_curriculum_range_gives_one_clear_line():
    with pytest.raises(ValueError, match=r'^algo.curriculum_start=10 and algo.curriculum_end=5 must satisfy'):
        algorithms.DUO(make_config('algo=duo', 'algo.curriculum_start=10', 'algo.curriculum_end=5'), K, MASK)
    with pytest.raises(ValueError, match=r'^algo.curriculum.start=10 and algo.curriculum_end=5 must satisfy'):
        algorithms.DUO(make_config('algo=duo', 'algo.curriculum.start=10', 'algo.curriculum_end=5'), K, MASK)
    with pytest.raises(ValueError, match=r'^algo.curriculum.gamma_min=0.0 must be < algo.gamma_max=-1.0 \(e.g.'):
        algorithms.DUO(make_config('algo=duo', 'algo.curriculum.gamma_min=0', 'algo.gamma_max=-1'), K, MASK)


# upstream main's scripts/train_lm1b_duo.sh, and the same settings in the flat keys
UPSTREAM_LM1B = ['algo.curriculum.mode=simple', 'algo.curriculum.gumbel_tau_log10_start=-3.0',
                 'algo.curriculum.gumbel_tau_log10_end=-3.0', 'algo.curriculum.gamma_min=-3.5',
                 'algo.curriculum.gamma_max=-1.75', 'algo.curriculum.start=0', 'algo.curriculum.end=500000']
FLAT_LM1B = ['algo.gumbel_tau_log10_start=-3.0', 'algo.gumbel_tau_log10_end=-3.0', 'algo.gamma_min=-3.5',
             'algo.gamma_max=-1.75', 'algo.curriculum_start=0', 'algo.curriculum_end=500000']


def test_both_spellings_of_the_curriculum_settings_give_the_same_curriculum():
    lm1b = algorithms.CurriculumSettings('simple', None, -3.5, -1.75, -3.0, -3.0, 0, 500_000)
    for overrides in (UPSTREAM_LM1B, FLAT_LM1B, UPSTREAM_LM1B + FLAT_LM1B, UPSTREAM_LM1B[:4] + FLAT_LM1B[3:],
                      ['algo.curriculum.gamma_min=-3.50', 'algo.gamma_min=-3.5', *FLAT_LM1B[1:]]):
        assert algorithms.curriculum_settings(make_config('algo=duo', *overrides), K) == lm1b, overrides
    # neither spelling: the defaults (the DUO paper's OWT recipe, SPEC §5)
    assert algorithms.curriculum_settings(make_config('algo=duo'), K) == algorithms.CurriculumSettings(
        'simple', None, -3.55, -1.85, -3.0, -3.0, 0, 500_000)
    a = algorithms.DUO(make_config('algo=duo', 'algo.curriculum.gamma_min=-3.5', 'algo.curriculum.gamma_max=-1.75',
                                   'algo.curriculum.gumbel_tau_log10_start=-1', 'algo.curriculum.end=300'), K, MASK)
    b = algorithms.DUO(make_config('algo=duo', 'algo.gamma_min=-3.5', 'algo.gamma_max=-1.75',
                                   'algo.gumbel_tau_log10_start=-1', 'algo.curriculum_end=300'), K, MASK)
    assert [a.tau(s) for s in (0, 150, 300)] == [b.tau(s) for s in (0, 150, 300)] == pytest.approx([0.1, 0.01, 1e-3])
    assert (a.start, a.end, a.curriculum.gamma_min, a.curriculum.gamma_max) == (0, 300, -3.5, -1.75)
    assert (b.start, b.end, b.curriculum.gamma_min, b.curriculum.gamma_max) == (0, 300, -3.5, -1.75)


@pytest.mark.parametrize('block, flat, value, other', [
    ('gamma_min', 'gamma_min', -3.5, -3.55), ('gamma_max', 'gamma_max', -1.75, -1.85),
    ('gumbel_tau_log10_start', 'gumbel_tau_log10_start', -1.0, -3.0),
    ('gumbel_tau_log10_end', 'gumbel_tau_log10_end', -2.0, -3.0), ('start', 'curriculum_start', 100000, 0),
    ('end', 'curriculum_end', 200000, 500000)])
def test_both_spellings_given_and_different_is_one_clear_line(block, flat, value, other):
    config = make_config('algo=duo', f'algo.curriculum.{block}={value}', f'algo.{flat}={other}')
    with pytest.raises(errors.ConfigError) as error:
        algorithms.DUO(config, K, MASK)
    assert str(error.value) == (f'algo.curriculum.{block}={value} and algo.{flat}={other} disagree: give the setting '
                                f'once (e.g. algo.curriculum.{block}={value})')


def test_curriculum_modes_pick_the_input_and_the_operator():
    gammas = ['algo.gamma_min=-2.65', 'algo.gamma_max=1.7']
    for mode, operator in (('simple', ns.GaussianCurriculum), ('efficient_cached', ns.GaussianCurriculum),
                           ('series', ns.GaussianCurriculum), ('poly7', ns.PolyCurriculum),
                           ('poly9', ns.PolyCurriculum)):
        algo = algorithms.DUO(make_config('algo=duo', f'algo.curriculum.mode={mode}', *gammas), K, MASK)
        assert isinstance(algo.curriculum, operator) and algo.mode == mode
        assert algo.top_k == (None if mode == 'simple' else 2)  # k = 2 unless set; simple: the full input
    for k in (1, 3, K - 1):
        config = make_config('algo=duo', 'algo.curriculum.mode=poly9', f'algo.curriculum.top_k={k}', *gammas)
        assert algorithms.DUO(config, K, MASK).top_k == k


@pytest.mark.parametrize('overrides, message', [
    (['algo.curriculum.mode=poly9', 'algo.curriculum.top_k=-1'],
     'algo.curriculum.top_k=-1 must be in [1, K-1 = 34] (e.g. algo.curriculum.top_k=2)'),
    (['algo.curriculum.mode=poly9', 'algo.curriculum.top_k=0'],
     'algo.curriculum.top_k=0 must be in [1, K-1 = 34] (e.g. algo.curriculum.top_k=2)'),
    (['algo.curriculum.mode=series', f'algo.curriculum.top_k={K}'],
     f'algo.curriculum.top_k={K} must be in [1, K-1 = 34] (e.g. algo.curriculum.top_k=2)'),
    (['algo.curriculum.mode=poly9', 'algo.curriculum.top_k=1.5'],
     'algo.curriculum.top_k=1.5 must be an integer (e.g. algo.curriculum.top_k=2)'),
    (['algo.curriculum.mode=poly9', 'algo.curriculum.top_k=two'],
     'algo.curriculum.top_k=two must be an integer (e.g. algo.curriculum.top_k=2)'),
    (['algo.curriculum.top_k=4'],
     'algo.curriculum.top_k=4 needs a top-k mode: algo.curriculum.mode=simple feeds the full relaxed one-hot '
     '(e.g. algo.curriculum.mode=poly9 algo.curriculum.top_k=4)'),
    (['algo.curriculum.mode=sigmoid'],
     "algo.curriculum.mode=sigmoid is not supported: a sigmoid fit misses the operator by up to 32% in alpha' "
     "(upstream also drops a factor 2); use algo.curriculum.mode=poly9"),
    (['algo.curriculum.mode=poly4'],
     "algo.curriculum.mode='poly4' is unknown: use one of simple, efficient_cached, series, poly3, poly5, poly7, "
     "poly9 (e.g. algo.curriculum.mode=poly9)"),
    (['algo.curriculum.mode=poly9', 'algo.gamma_min=-5', 'algo.gamma_max=5'],
     'algo.curriculum.mode=poly9 cannot represent the duality operator on gamma in [-5.0, 5.0] (K=35): the fitted '
     'alpha_t leaves (0, 1] or stops decreasing; use the exact operator with the top-k input '
     '(algo.curriculum.mode=efficient_cached) or narrow the gamma range'),
])
def test_bad_curriculum_mode_or_top_k_is_one_clear_line(overrides, message):
    with pytest.raises(ValueError) as error:
        algorithms.DUO(make_config('algo=duo', *overrides), K, MASK)
    assert str(error.value) == message


def test_upstream_only_curriculum_keys_are_accepted_and_ignored(caplog):
    ignored = ['algo.curriculum.integral_cache_path=/data/integral/gpt2.pkl', 'algo.curriculum.cache_dir=./coefficients',
               'algo.curriculum.n_series_terms=150']
    with caplog.at_level('INFO', logger='algorithms'):
        algo = algorithms.DUO(make_config('algo=duo', 'algo.curriculum.mode=series', *ignored), K, MASK)
    assert isinstance(algo.curriculum, ns.GaussianCurriculum)
    for override in ignored:
        key, value = override.split('=')
        assert any(f'{key}={value} is accepted for upstream command lines and ignored' in r.message
                   for r in caplog.records), key


# ---------------------------------------------------------------------------------------------
# fine-tuning starts (training.finetune_path)
def test_finetune_from_our_checkpoint_starts_from_its_ema_weights(tmp_path):
    config = distill_config()
    trained = diffusion.Diffusion(make_config('algo=duo', *TINY), K, MASK, bos_id=2)
    randomize(trained.backbone, seed=2)
    trained.ema.shadow_params = [p.detach() * 2 for p in trained.backbone.parameters()]
    path = tmp_path / 'trained.ckpt'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in trained.backbone.state_dict().items()},
                'ema': trained.ema.state_dict()}, path)
    with_config = copy.deepcopy(config)
    with_config.training.finetune_path = str(path)
    model = diffusion.Diffusion(config, K, MASK, bos_id=2)
    checkpoints.start_from(model, main.read_finetune(with_config))
    for p, shadow, mine in zip(trained.backbone.parameters(), trained.ema.shadow_params, model.backbone.parameters()):
        assert torch.equal(mine, shadow) and not torch.equal(mine, p)
    assert torch.equal(flat(model.ema.shadow_params), flat(model.backbone.parameters()))
    assert model.ema.num_updates == 0


def test_finetune_from_a_hugging_face_directory_adopts_its_sizes(tmp_path):
    from models.hf_format import save_hf
    source = randomize(diffusion.make_backbone(make_config('algo=duo', *TINY, 'model.hidden_size=48',
                                                           'model.n_blocks=2', 'model.cond_dim=24'), K, False))
    save_hf(source, tmp_path / 'released')
    config = distill_config(f'training.finetune_path={tmp_path / "released"}')  # says hidden 32, 1 block
    released = main.read_finetune(config)
    assert (config.model.hidden_size, config.model.n_blocks, config.model.cond_dim) == (48, 2, 24)
    model = diffusion.Diffusion(config, K, MASK, bos_id=2)
    checkpoints.start_from(model, released)
    assert torch.equal(flat(model.backbone.parameters()), flat(source.parameters()))


def test_missing_finetune_path_gives_one_clear_line(tmp_path):
    config = distill_config(f'training.finetune_path={tmp_path / "nothing.ckpt"}')
    with pytest.raises(ValueError, match=r'^training.finetune_path=.*nothing.ckpt does not exist: pass'):
        main.read_finetune(config)


# ---------------------------------------------------------------------------------------------
# end to end through main.py
def save_random_ar_judge(path, length):
    """An untrained-but-random AR checkpoint in our layout (the judge needs no training to be valid)."""
    config = make_config('algo=ar', *TINY, f'model.length={length}')
    backbone = randomize(diffusion.make_backbone(config, K, causal=True))
    torch.save({'state_dict': {'backbone.' + k: v for k, v in backbone.state_dict().items()},
                'model_config': {'length': length}}, path)


def read_metrics(run_dir):
    import csv
    with open(run_dir / 'logs' / 'metrics.csv') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def markov_dir(tmp_path_factory):
    from test_main import write_markov_corpus
    corpus = tmp_path_factory.mktemp('markov')
    write_markov_corpus(corpus, 20_000, 3_000)
    return corpus


FAST = ['trainer.limit_val_batches=2', 'trainer.log_every_n_steps=1', 'loader.global_batch_size=8',
        'algo.gamma_min=-2.65', 'algo.gamma_max=1.7']


@pytest.mark.slow
@pytest.mark.parametrize('mode', [[], ['algo.curriculum.mode=poly9', 'algo.curriculum.top_k=3']], ids=['simple', 'top-k'])
def test_duo_curriculum_through_main(markov_dir, tmp_path, mode):
    from test_main import common, run_main
    proc = run_main('mode=train', *common(markov_dir, tmp_path, 'duo'), *FAST, 'algo.curriculum.end=3', *mode,
                    'trainer.max_steps=6', 'checkpointing.every_n_train_steps=6', 'trainer.val_check_interval=6')
    if mode:  # the fitted operator reports its distance to the exact one
        assert 'algo.curriculum.mode=poly9 on gamma in [-2.65, 1.7] (K=35)' in proc.stderr + proc.stdout
    rows = read_metrics(tmp_path)
    train = [r for r in rows if r['train/loss']]
    assert [float(r['train/tau']) for r in train] == pytest.approx([1e-3] * 3 + [0.0] * 3)
    assert any(r['val/nll'] for r in rows) and (tmp_path / 'checkpoints' / 'step-6.ckpt').exists()


@pytest.mark.slow
def test_distillation_through_main(markov_dir, tmp_path):
    from test_main import LENGTH, common, run_main
    sizes = [a for a in common(markov_dir, tmp_path, 'duo') if a.startswith('model')]
    start = new_model(make_config('algo=duo', *sizes))  # a 'trained' DUO model to distil
    torch.save({'state_dict': {'backbone.' + k: v for k, v in start.backbone.state_dict().items()},
                'ema': start.ema.state_dict()}, tmp_path / 'duo.ckpt')
    run_dir = tmp_path / 'distill'
    args = [*common(markov_dir, run_dir, 'distillation'), *FAST, 'algo.update_teacher_every=2', 'algo.T=8',
            f'training.finetune_path={tmp_path / "duo.ckpt"}']
    proc = run_main('mode=train', *args, 'trainer.max_steps=6', 'checkpointing.every_n_train_steps=3',
                    'trainer.val_check_interval=6')
    assert 'Initialised the weights from' in proc.stderr + proc.stdout
    rows = [r for r in read_metrics(run_dir) if r['train/loss']]
    assert [float(r['train/delta']) for r in rows] == [1 / 8, 1 / 8, 2 / 8, 2 / 8, 4 / 8, 4 / 8]
    ckpts = run_dir / 'checkpoints'
    step3, step6 = (torch.load(ckpts / f'step-{s}.ckpt', weights_only=False) for s in (3, 6))
    assert step3['teacher']['round'] == 1  # mid-round: stored
    assert 'teacher' not in step6  # round boundary: a resume refreshes it anyway
    run_main('mode=ppl_eval', *args)
    result = json.loads((run_dir / 'ppl_eval.json').read_text())
    assert result['algo'] == 'distillation' and math.isfinite(result['nll']) and result['nll'] > 0
    save_random_ar_judge(tmp_path / 'judge.ckpt', LENGTH)
    run_main('mode=sample_eval', *args, 'sampling.steps=8', 'sampling.num_sample_batches=1',
             'loader.eval_batch_size=4', f'eval.gen_ppl_eval_model_name_or_path={tmp_path / "judge.ckpt"}')
    samples = json.loads((run_dir / 'samples.json').read_text())
    assert samples['steps'] == 8 and len(samples['generated_seqs']) == 4
    assert math.isfinite(samples['generative_ppl']) and samples['generative_ppl'] > 1
