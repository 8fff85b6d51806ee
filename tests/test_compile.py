"""model.compile: the DiT blocks compiled in place where torch.compile can run, ignored (with a
warning) where it cannot; the compiled network computes what the eager one does."""
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

import diffusion
import runtime
from conftest import ROOT

SMALL = ['model=micro', 'model.length=8', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=2',
         'model.cond_dim=16', 'trainer.accelerator=cpu']


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=[*SMALL, *overrides])


def compiled(backbone):
    return [block._compiled_call_impl is not None for block in backbone.blocks]


def test_compile_is_off_by_default_and_compiles_the_blocks_in_place_when_asked(monkeypatch):
    monkeypatch.setattr(runtime.shutil, 'which', lambda name: '/usr/bin/' + name)
    plain = diffusion.make_backbone(config('algo=duo_base'), 35, causal=False)
    assert compiled(plain) == [False, False]
    backbone = diffusion.make_backbone(config('algo=duo_base', 'model.compile=true'), 35, causal=False)
    assert compiled(backbone) == [True, True]
    assert list(backbone.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys


def test_compile_without_a_cpu_compiler_is_ignored_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(runtime.shutil, 'which', lambda name: None)
    assert 'C++ compiler' in runtime.compile_unsupported('cpu')
    with caplog.at_level(logging.WARNING, logger='diffusion'):
        backbone = diffusion.make_backbone(config('algo=duo_base', 'model.compile=true'), 35, causal=False)
    assert compiled(backbone) == [False, False]
    assert 'model.compile=true ignored: no C++ compiler' in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(runtime.compile_unsupported('cpu') is not None, reason='torch.compile cannot run here')
def test_compiled_blocks_compute_the_eager_logits_and_gradients():
    torch.manual_seed(0)
    eager = diffusion.make_backbone(config('algo=duo_base'), 35, causal=False)
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.3)
    fast = diffusion.make_backbone(config('algo=duo_base', 'model.compile=true', 'model.dropout=0.0'), 35, causal=False)
    fast.load_state_dict(eager.state_dict())
    x, sigma = torch.randint(0, 35, (2, 8)), torch.tensor([0.5, 2.0])
    grads = []
    for model in (eager.eval(), fast.eval()):
        model.zero_grad()
        logits = model(x, sigma)
        logits.square().sum().backward()
        grads.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    for g_fast, g_eager in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-5)
