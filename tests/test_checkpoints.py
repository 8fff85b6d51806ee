"""checkpoints.py: reading without running code, what a checkpoint describes, building its model,
one writer per run directory, last.ckpt and the newest readable checkpoint; released baselines (an
upstream SEDD .ckpt in upstream's layout, Hugging Face SEDD / MDLM weights) configure, load,
evaluate and sample without remote code.

The malicious checkpoints here are valid Lightning checkpoints with one extra pickled object whose
__reduce__ would run a shell command that creates a marker file: on every loading path the file
must be refused with one line and the marker must never appear.
"""
import os
import subprocess
import sys
import types

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.data import AttributeDict
from omegaconf import OmegaConf

import checkpoints
import dataloader
import diffusion
import errors
import kaggle_train
import main
import metrics
from conftest import ROOT
from dataloader import Text8Tokenizer
from diffusion import Diffusion
from models import hf_format
from models.dit import DiT

K = 35  # the text8 tokenizer
TINY = ['model=micro', 'model.length=16', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16', 'data.tokenizer_name_or_path=text8']


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=[*TINY, *overrides])


def random_dit(causal=False, seed=0, length=16):
    torch.manual_seed(seed)
    model = DiT(K, 32, 16, 1, 2, length, causal=causal)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


class Evil:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def our_checkpoint(path, model=None, algo='duo_base', extra=None):
    """A checkpoint as our training writes it (Diffusion.on_save_checkpoint's keys)."""
    config = make_config(f'algo={algo}')
    module = Diffusion(config, K, 4, 2)
    if model is not None:
        module.backbone.load_state_dict(model.state_dict())
    checkpoint = {'state_dict': module.state_dict(), 'global_step': 3, 'micro_step': 6}
    module.on_save_checkpoint(checkpoint)
    checkpoint.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# ---- no code runs ---------------------------------------------------------------------------
@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / 'ran'
    path = our_checkpoint(tmp_path / 'evil.ckpt', extra={'payload': Evil(marker)})
    return path, marker


def assert_refused(error, path, marker):
    message = str(error.value)
    assert '\n' not in message and str(path) in message and 'system' in message and 'refused' in message
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_on_every_loading_path(evil, tmp_path):
    path, marker = evil
    config = make_config('mode=ppl_eval', f'eval.checkpoint_path={path}', f'training.finetune_path={path}')
    attempts = {
        'read': lambda: checkpoints.read_checkpoint(path),
        'eval and sample (load_for_eval)': lambda: main.load_for_eval(config),
        'finetune': lambda: main.read_finetune(config),
        'resume': lambda: checkpoints.check_resumable(path, Diffusion(make_config(), K, 4, 2)),
        "Lightning's own load (resume inside fit)": lambda: checkpoints.AtomicCheckpointIO().load_checkpoint(path),
        'judge': lambda: metrics.GenerativePerplexity(str(path), tokenizer=Text8Tokenizer()),
        'kaggle_train --resume-from': lambda: kaggle_train.checkpoint_step(path),
        'progress': lambda: checkpoints.read_progress(path),
    }
    for name, attempt in attempts.items():
        with pytest.raises(errors.CheckpointError) as error:
            attempt()
        assert_refused(error, path, marker), name
    # the same file without the payload loads: the refusal is about the object, not the file
    assert checkpoints.read_checkpoint(our_checkpoint(tmp_path / 'fine.ckpt'))['global_step'] == 3


def test_a_malicious_checkpoint_in_torch_old_format_is_refused_too(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'old.ckpt'
    torch.save({'state_dict': {}, 'payload': Evil(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(errors.CheckpointError) as error:
        checkpoints.read_checkpoint(path)
    assert_refused(error, path, marker)


# ---- upstream checkpoints --------------------------------------------------------------------
def fake_module(name):
    """Register module `name` (and its parents) so that pickle can name a class in it."""
    parts = name.split('.')
    made = []
    for i in range(1, len(parts) + 1):
        full = '.'.join(parts[:i])
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)
            made.append(full)
    return sys.modules[name], made


def upstream_checkpoint(path, backbone, algo_name, length=16, tokenizer_module='transformers.models.gpt2'
                        '.tokenization_gpt2_fast'):
    """An upstream DUO checkpoint as its Trainer.fit writes it: Lightning's loops, callbacks,
    optimizer and scheduler state, the EMA, and hyper_parameters holding the Hydra config
    (OmegaConf) and the tokenizer object, pickled under transformers 4.x's class path (which
    transformers 5 no longer has)."""
    module, made = fake_module(tokenizer_module)

    class GPT2TokenizerFast:
        def __init__(self):
            self.vocab = {'hello': 0}
            self.backend = b'\x00serialized rust tokenizer'

    GPT2TokenizerFast.__module__ = tokenizer_module
    module.GPT2TokenizerFast = GPT2TokenizerFast
    config = OmegaConf.create({
        'algo': {'name': algo_name, 'backbone': 'dit', 'parameterization': 'subs', 'time_conditioning': False, 'T': 0},
        'model': {'hidden_size': 32, 'cond_dim': 16, 'length': length, 'n_blocks': 1, 'n_heads': 2},
        'noise': {'type': 'log-linear', 'eps': 1e-3}, 'data': {'tokenizer_name_or_path': 'text8'},
        'loader': {'batch_size': '${div_up:${.global_batch_size}, 2}'}})

    class Upstream(L.LightningModule):
        def __init__(self, config, tokenizer):
            super().__init__()
            self.save_hyperparameters()
            self.backbone = backbone

        def training_step(self, batch, batch_idx):
            return self.backbone(batch[0], torch.zeros(len(batch[0]))).float().logsumexp(-1).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-9)

        def on_save_checkpoint(self, checkpoint):
            checkpoint['ema'] = {'decay': 0.9999, 'num_updates': 1, 'collected_params': None,
                                 'shadow_params': [p.detach().clone() for p in self.backbone.parameters()]}
            checkpoint['sampler'] = {'random_state': None}

    try:
        model = Upstream(config, GPT2TokenizerFast())
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, K, (4, length))), batch_size=2)
        trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=path.parent, accelerator='cpu')
        trainer.fit(model, data)
        trainer.save_checkpoint(path)
    finally:
        for name in made:
            sys.modules.pop(name, None)
    return path


def test_an_upstream_checkpoint_with_a_transformers_4_tokenizer_loads_and_gives_its_model(tmp_path):
    backbone = random_dit()
    path = upstream_checkpoint(tmp_path / 'mdlm.ckpt', backbone, 'mdlm')
    assert 'transformers.models.gpt2.tokenization_gpt2_fast' not in sys.modules  # never imported to load it
    config = make_config('mode=ppl_eval', f'eval.checkpoint_path={path}', 'algo=duo_base')
    source = checkpoints.read_source(path)
    assert source.algo['name'] == 'mdlm' and source.model == {'hidden_size': 32, 'cond_dim': 16, 'n_blocks': 1,
                                                                'n_heads': 2, 'length': 16}
    assert source.tokenizer == 'text8' and source.noise == {'type': 'log-linear', 'eps': 1e-3}
    checkpoints.configure_from(config, source)  # algo= not given on the command line: the checkpoint's is used
    assert config.algo.name == 'mdlm' and config.algo.time_conditioning is False
    model = checkpoints.load_model(config, Text8Tokenizer(), source)
    x = torch.randint(0, K, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x, torch.zeros(2)), backbone(x, torch.zeros(2)), rtol=0, atol=0)


def test_a_checkpoint_of_another_family_is_refused_when_the_algorithm_is_given(tmp_path):
    path = our_checkpoint(tmp_path / 'duo_base.ckpt', random_dit())
    config = make_config('mode=ppl_eval', 'algo=mdlm', f'eval.checkpoint_path={path}')
    with pytest.raises(errors.ConfigError, match=r'is a checkpoint of algo=duo_base, whose network does not fit '
                                                 r'algo=mdlm: drop algo= .* or pass algo=duo_base$'):
        checkpoints.configure_from(config, checkpoints.read_source(path), explicit={'algo'})
    # the same family is fine (a distilled DUO model sampled as duo_base), and not giving algo= adopts it
    for algo, explicit in (('distillation', {'algo'}), ('mdlm', frozenset())):
        config = make_config('mode=ppl_eval', f'algo={algo}', f'eval.checkpoint_path={path}')
        checkpoints.configure_from(config, checkpoints.read_source(path), explicit=explicit)
        assert config.algo.name == (algo if explicit else 'duo_base')


def test_our_checkpoint_describes_its_model_so_no_override_is_needed(tmp_path):
    trained = make_config('algo=mdlm', 'model.hidden_size=48', 'model.n_heads=4', 'model.length=24', 'noise=cosine',
                          'data=stdlib')
    module = Diffusion(trained, K, 4, 2)
    checkpoint = {'state_dict': module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / 'm.ckpt')
    config = make_config('mode=ppl_eval', f'eval.checkpoint_path={tmp_path / "m.ckpt"}')  # defaults: duo_base, owt
    checkpoints.configure_from(config, checkpoints.read_source(tmp_path / 'm.ckpt'))
    assert (config.algo.name, config.model.hidden_size, config.model.n_heads, config.model.length) == ('mdlm', 48, 4, 24)
    assert config.noise.type == 'cosine' and config.data.name == 'stdlib'
    assert config.data.cache_dir is None  # where this machine keeps data is never taken from a checkpoint


def test_hugging_face_time_conditioning_false_is_honoured(tmp_path):
    backbone = random_dit()
    # a config.json that names no algorithm of ours (as some released ones): algo= decides
    hf_format.save_hf(backbone, tmp_path / 'released', model_type='dit', time_conditioning=False)
    config = make_config('mode=sample_eval', 'algo=duo_base', f'eval.checkpoint_path={tmp_path / "released"}')
    source = checkpoints.read_source(tmp_path / 'released')
    checkpoints.configure_from(config, source, explicit={'algo'})  # time-conditioned by default
    model = checkpoints.load_model(config, Text8Tokenizer(), source)
    assert model.algo.time_conditioning is False
    assert torch.equal(model.algo.sigma(torch.tensor([[0.3], [0.9]])), torch.zeros(2))


# ---- one writer per run directory ---------------------------------------------------------
def test_a_second_writer_is_refused_with_one_line_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    lock = checkpoints.RunLock(tmp_path).acquire()
    with pytest.raises(errors.RunStopped) as error:
        checkpoints.RunLock(tmp_path).acquire()
    assert f'PID {os.getpid()}' in str(error.value) and 'hydra.run.dir' in str(error.value)
    assert '\n' not in str(error.value)
    lock.release()
    assert not (tmp_path / '.lock').exists()
    # a holder killed by SIGKILL: the kernel releases its lock, the next run takes it over
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
                               'import checkpoints; lock = checkpoints.RunLock(sys.argv[2]).acquire(); print("held", '
                               'flush=True); time.sleep(60)', str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(errors.RunStopped, match=f'PID {holder.pid}'):
        checkpoints.RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    with caplog.at_level('INFO', logger='checkpoints'):
        checkpoints.RunLock(tmp_path).acquire().release()
    assert f'Taking over the lock of PID {holder.pid}' in caplog.text


# ---- last.ckpt, retention, disk messages --------------------------------------------------
def test_the_newest_readable_checkpoint_is_named_for_a_corrupt_last_ckpt(tmp_path):
    directory = tmp_path / 'checkpoints'
    for step in (10, 20, 30):
        our_checkpoint(directory / f'step-{step}.ckpt')
    (directory / 'step-30.ckpt').write_bytes((directory / 'step-30.ckpt').read_bytes()[:100])  # newest is damaged too
    (directory / 'last.ckpt').write_bytes(b'cut')
    with pytest.raises(errors.CheckpointError) as error:
        checkpoints.check_resumable(directory / 'last.ckpt', Diffusion(make_config(), K, 4, 2))
    assert f'cp {directory / "step-20.ckpt"} {directory / "last.ckpt"}' in str(error.value)


def test_disk_messages_give_sizes_that_differ_and_name_only_files_that_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, 'free_bytes', lambda d: 28_300_000)
    with pytest.raises(errors.DiskFullError) as error:
        checkpoints.make_room(tmp_path / 'step-1.ckpt', 20_000_000)
    message = str(error.value)
    assert 'needs about 0.0368 GB' in message and 'has 0.0283 GB free' in message
    assert 'last.ckpt' not in message  # there is none to resume from yet
    (tmp_path / 'last.ckpt').write_bytes(b'x')
    with pytest.raises(errors.DiskFullError, match='resume from .*last.ckpt'):
        checkpoints.make_room(tmp_path / 'step-1.ckpt', 20_000_000)


# ---- released baselines: an upstream SEDD .ckpt, Hugging Face SEDD / MDLM weights (SPEC-2 §11) ----
SIZES = {'hidden_size': 32, 'cond_dim': 16, 'n_blocks': 2, 'n_heads': 2, 'length': 12}


def trained_sedd(seed=0):
    """A 'trained' SEDD module of SIZES (random weights, an EMA that differs from them)."""
    config = make_config('algo=sedd', *(f'model.{k}={v}' for k, v in SIZES.items()))
    tokenizer = dataloader.get_tokenizer(config)
    module = diffusion.Diffusion(config, *dataloader.model_vocab(tokenizer), tokenizer.bos_token_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    module.ema.shadow_params = [p.detach() * 0.5 for p in module.backbone.parameters()]
    module.ema.num_updates = 100
    return module


def upstream_config():
    """What upstream's main.py pickles: its whole Hydra config (keys we do not have included)."""
    return OmegaConf.create({
        'mode': 'train', 'seed': 1,
        'algo': {'name': 'sedd', 'backbone': 'dit', 'parameterization': 'score', 'time_conditioning': True, 'T': 0,
                 'subs_masking': False, 'causal_attention': False, 'ignore_bos': False, 'loss_type': 'elbo'},
        'noise': {'type': 'log-linear', 'eps': 1e-3},
        'model': {'name': 'small', 'type': 'ddit', 'hidden_size': 32, 'cond_dim': 16, 'length': SIZES['length'],
                  'n_blocks': 2, 'n_heads': 2, 'scale_by_sigma': True, 'dropout': 0.1, 'tie_word_embeddings': False},
        'data': {'train': 'openwebtext-split', 'valid': 'openwebtext-split', 'tokenizer_name_or_path': 'text8',
                 'wrap': True, 'streaming': False},
        'sampling': {'predictor': 'analytic', 'steps': 128, 'noise_removal': 'ancestral'},
        'training': {'ema': 0.9999, 'antithetic_sampling': True, 'sampling_eps': 1e-3},
    })


def save_upstream(module, path):
    """A Lightning checkpoint as upstream's trainer writes it."""
    torch.save({
        'epoch': 3, 'global_step': 100, 'pytorch-lightning_version': '2.2.1',
        'state_dict': {'backbone.' + k: v for k, v in module.backbone.state_dict().items()},
        'loops': {'fit_loop': {'state_dict': {}}}, 'callbacks': {}, 'optimizer_states': [], 'lr_schedulers': [],
        'hparams_name': 'kwargs', 'hyper_parameters': AttributeDict(config=upstream_config(), tokenizer=None),
        'ema': {'decay': 0.9999, 'num_updates': 100, 'shadow_params': module.ema.shadow_params},
    }, path)


def evaluate(model, seed=0):
    """The validation bound of one fixed batch, and 3 samples."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(5, 30, (4, SIZES['length']), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        per_token, _ = model.algo.eval_loss(model, x0, torch.ones_like(x0), model.algo.times(model, 4), 0)
        samples = model.generate(3, generator=torch.Generator().manual_seed(seed))
    return per_token, samples


def load(path, *overrides, explicit=frozenset()):
    config = make_config(*overrides)  # the default algo (duo_base) and model sizes: the checkpoint decides
    source = checkpoints.read_source(str(path))
    checkpoints.configure_from(config, source, explicit)
    tokenizer = dataloader.get_tokenizer(config)
    return config, checkpoints.load_model(config, tokenizer, source)


def test_upstream_sedd_ckpt_configures_loads_its_ema_evaluates_and_samples(tmp_path):
    trained = trained_sedd()
    save_upstream(trained, tmp_path / 'sedd.ckpt')
    config, model = load(tmp_path / 'sedd.ckpt', 'sampling.steps=4')
    assert config.algo.name == 'sedd' and config.algo.time_conditioning is True
    assert config.sampling.predictor == 'analytic'          # as algo=sedd gives it
    assert {k: config.model[k] for k in SIZES} == SIZES and config.noise.type == 'log-linear'
    for mine, ema in zip(model.backbone.parameters(), trained.ema.shadow_params):
        assert torch.equal(mine, ema)                        # the EMA weights are evaluated
    # the same as the trained module evaluated with its EMA applied
    reference = trained_sedd()
    reference.ema.copy_to(reference.backbone.parameters())
    reference.config.sampling.steps = 4
    got, expected = evaluate(model), evaluate(reference)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[0].sum() > 0 and (got[1] != model.mask_id).all()


def test_upstream_ckpt_raw_weights_with_eval_disable_ema(tmp_path):
    trained = trained_sedd()
    save_upstream(trained, tmp_path / 'sedd.ckpt')
    _, model = load(tmp_path / 'sedd.ckpt', 'eval.disable_ema=true')
    for mine, raw in zip(model.backbone.parameters(), trained.backbone.parameters()):
        assert torch.equal(mine, raw)


@pytest.mark.parametrize('model_type', ['sedd', 'mdlm'])
def test_hugging_face_sedd_and_mdlm_weights_configure_load_evaluate_and_sample(tmp_path, model_type):
    trained = trained_sedd()
    trained.ema.copy_to(trained.backbone.parameters())      # released weights have the EMA applied
    hf_format.save_hf(trained.backbone, tmp_path / 'released', model_type=model_type,
                      time_conditioning=model_type == 'sedd')
    config, model = load(tmp_path / 'released', 'sampling.steps=4', 'sampling.predictor=analytic',
                         explicit={'sampling.predictor'})
    assert config.algo.name == model_type and config.algo.time_conditioning == (model_type == 'sedd')
    assert config.sampling.predictor == 'analytic' and {k: config.model[k] for k in SIZES} == SIZES
    for mine, theirs in zip(model.backbone.parameters(), trained.backbone.parameters()):
        assert torch.equal(mine, theirs)
    per_token, samples = evaluate(model)
    assert per_token.isfinite().all() and samples.shape == (3, SIZES['length']) and (samples != model.mask_id).all()
    if model_type == 'sedd':  # the same network as the upstream checkpoint's EMA: the same bound
        save_upstream(trained_sedd(), tmp_path / 'sedd.ckpt')
        assert torch.equal(per_token, evaluate(load(tmp_path / 'sedd.ckpt', 'sampling.steps=4')[1])[0])
