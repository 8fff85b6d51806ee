"""runtime.py: precision, devices, workers, logit blocks and the hub check.

(The attention backend's decisions are tested in test_dit.py, compile support in test_compile.py.)
"""
import os
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

import runtime


@pytest.mark.parametrize('capability, expected', [(None, '32-true'), ((7, 5), '16-mixed'), ((6, 0), '16-mixed'),
                                                  ((8, 0), 'bf16-mixed'), ((9, 0), 'bf16-mixed')])
def test_auto_precision(capability, expected):
    assert runtime.auto_precision(capability) == expected


def test_precision_spellings_dtypes_and_autocast():
    for spelling in ('16', 'fp16', '16-mixed'):
        assert runtime.precision_dtype(spelling) == torch.float16
    assert runtime.precision_dtype('bf16') == runtime.precision_dtype('bf16-mixed') == torch.bfloat16
    assert runtime.precision_dtype('32') is None and not runtime.is_half('32-true') and runtime.is_half('bf16')
    with runtime.autocast('cpu', 'bf16-mixed'):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert runtime.resolve_precision('16', 'cpu') == '32-true'  # fp16 needs a GPU: fp32 on the CPU
    with pytest.raises(ValueError, match=r'^trainer.precision=64 is not supported'):
        runtime.resolve_precision('64', 'cpu')


@pytest.mark.parametrize('cpus, devices, accelerator, expected', [
    (2, 1, 'cpu', 1), (1, 1, 'cpu', 0), (64, 1, 'gpu', 4), (16, 8, 'gpu', 1), (16, '0,1', 'gpu', 4),
    (8, [0, 1, 2, 3], 'gpu', 1)])
def test_default_num_workers(monkeypatch, cpus, devices, accelerator, expected):
    monkeypatch.setattr(runtime, 'cpus', lambda: cpus)
    trainer = OmegaConf.create({'devices': devices, 'accelerator': accelerator})
    assert runtime.default_num_workers(trainer) == expected


def test_logit_blocks_bound_the_logits_of_one_forward():
    K, L = 50258, 512
    rows = runtime.sequences_per_block('cpu', L, K)
    assert rows * L * K <= runtime.LOGIT_ELEMENTS['cpu'] < (rows + 1) * L * K
    assert runtime.sequences_per_block('cpu', 1 << 20, K) == 1  # never zero


def test_model_sizes_are_read_from_the_configs():
    sizes = runtime.model_sizes()
    assert sizes['small'] == {'hidden_size': 768, 'cond_dim': 128, 'n_blocks': 12, 'n_heads': 12, 'dropout': 0.1}
    assert set(sizes) >= {'micro', 'tiny', 'small', 'medium'}


def test_an_unreachable_hub_is_found_in_seconds_and_the_run_goes_offline(monkeypatch):
    for variable in runtime.HUB_OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    runtime.hub_reachable.cache_clear()
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    start = time.monotonic()
    try:
        assert runtime.go_offline_if_unreachable() is True
    finally:
        runtime.hub_reachable.cache_clear()
    assert time.monotonic() - start < 5
    assert all(os.environ[v] == '1' for v in runtime.HUB_OFFLINE_VARIABLES)
    assert sys.modules['huggingface_hub.constants'].HF_HUB_OFFLINE is True  # libraries already imported too
