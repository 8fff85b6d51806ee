"""Loaders (SPEC §2): seeded shuffling, DDP sharding, worker/pinning defaults, and exact resume
through a real Lightning checkpoint (the batches after a resume are the ones an uninterrupted
run would have seen: no repeats, no skips).

The blocks here are synthetic: row i holds the id i everywhere, so a batch names its rows.
"""
import json
import zlib

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import checkpoints
import dataloader
import errors
import runtime


def make_cache(path, n, length=6):
    """A BlockCache whose row i is [i] * length (uint16), written as the cache writes it."""
    path.mkdir(parents=True, exist_ok=True)
    blocks = np.repeat(np.arange(n, dtype=np.uint16)[:, None], length, axis=1)
    blocks.tofile(path / 'blocks.bin')
    (path / 'meta.json').write_text(json.dumps({'format': dataloader.CACHE_VERSION, 'blocks': n, 'length': length,
                                                'dtype': 'uint16', 'padded': False, 'documents': n,
                                                'tokens': n * length, 'crc32': zlib.crc32(blocks)}))
    return dataloader.BlockCache(path)


def loader_config(num_workers=0, pin_memory=None, accelerator='cpu', devices=1):
    return OmegaConf.create({'loader': {'num_workers': num_workers, 'pin_memory': pin_memory},
                             'trainer': {'accelerator': accelerator, 'devices': devices}})


def rows(batch_indices, n):
    return [i % n for i in batch_indices]


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


# ---- shuffling and sharding -----------------------------------------------------------------
def test_train_batches_are_seeded_permutations():
    n, bs = 50, 5
    epoch = take(iter(dataloader.TrainBatchSampler(n, bs, seed=3)), 10)
    assert sorted(i for b in epoch for i in rows(b, n)) == list(range(n))  # one epoch: every block once
    assert epoch == take(iter(dataloader.TrainBatchSampler(n, bs, seed=3)), 10)
    assert epoch != take(iter(dataloader.TrainBatchSampler(n, bs, seed=4)), 10)
    two = take(iter(dataloader.TrainBatchSampler(n, bs, seed=3)), 20)
    assert [rows(b, n) for b in two[10:]] != [rows(b, n) for b in epoch]  # a new order each epoch
    assert all(i // n == 1 for b in two[10:] for i in b)  # sample numbers count epochs


def test_start_continues_the_stream():
    full = take(iter(dataloader.TrainBatchSampler(37, 4, seed=1)), 30)  # 9 batches per epoch
    for start in (0, 1, 8, 9, 10, 23):
        sampler = dataloader.TrainBatchSampler(37, 4, seed=1)
        sampler.start = start
        assert take(iter(sampler), 30 - start) == full[start:]


@pytest.mark.parametrize('world', [2, 3])
def test_ddp_shards_are_disjoint(monkeypatch, world):
    n, bs = 41, 3
    per_rank = n // world
    train, evals = [], []
    for rank in range(world):
        monkeypatch.setattr(runtime, 'rank_world', lambda r=rank: (r, world))
        batches = take(iter(dataloader.TrainBatchSampler(n, bs, seed=0)), per_rank // bs)
        train.append([i for b in batches for i in rows(b, n)])
        evals.append([i for b in dataloader.EvalBatchSampler(n, 4) for i in b])
        assert len(dataloader.EvalBatchSampler(n, 4)) == len(list(dataloader.EvalBatchSampler(n, 4)))
    flat = [i for r in train for i in r]
    assert len(flat) == len(set(flat)) == world * (per_rank // bs) * bs  # no block on two ranks
    assert sum(evals, []) == list(range(n))  # validation: every block exactly once over the ranks


def test_too_few_blocks_for_a_batch():
    with pytest.raises(errors.DataError, match='fewer than loader.batch_size=8'):
        next(iter(dataloader.TrainBatchSampler(5, 8, seed=0)))


# ---- pinned memory ------------------------------------------------------------------------
def test_pin_memory_only_on_gpu(tmp_path):
    dataset = dataloader.BlockDataset(make_cache(tmp_path / 'c', 8))
    sampler = dataloader.EvalBatchSampler(8, 4)
    assert not dataloader._loader(dataset, sampler, loader_config(pin_memory=True)).pin_memory
    assert not dataloader._loader(dataset, sampler, loader_config()).pin_memory
    assert dataloader._loader(dataset, sampler, loader_config(accelerator='gpu')).pin_memory
    assert not dataloader._loader(dataset, sampler, loader_config(pin_memory=False, accelerator='gpu')).pin_memory


def test_batches_are_int64_with_masks(tmp_path):
    dataset = dataloader.BlockDataset(make_cache(tmp_path / 'c', 10))
    batch = dataset.__getitems__([7, 2, 19, 2])  # unsorted, repeated, a second-epoch sample number
    assert batch['input_ids'].dtype == torch.int64 and batch['input_ids'][:, 0].tolist() == [7, 2, 9, 2]
    assert batch['attention_mask'].dtype == torch.int64 and bool((batch['attention_mask'] == 1).all())


# ---- resume through a Lightning checkpoint --------------------------------------------------
class Recorder(L.LightningModule):
    """Counts micro-batches like diffusion.Diffusion (`micro_step`, saved in the checkpoint) and
    records which blocks each one held."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.micro_step, self.seen = 0, []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch['input_ids'][:, 0].tolist())
        self.micro_step += 1
        return (self.weight * batch['input_ids'].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):
        checkpoint['micro_step'] = self.micro_step

    def on_load_checkpoint(self, checkpoint):
        self.micro_step = checkpoint['micro_step']


def fit(cache, steps, num_workers, ckpt_path=None, save_to=None):
    loader = dataloader._loader(dataloader.BlockDataset(cache), dataloader.TrainBatchSampler(len(cache), 4, seed=7),
                                loader_config(num_workers=num_workers))
    if ckpt_path is not None:  # as main.py does
        loader.batch_sampler.start = checkpoints.read_progress(ckpt_path)[1]
    model = Recorder()
    trainer = L.Trainer(accelerator='cpu', devices=1, max_steps=steps, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model.seen


@pytest.mark.parametrize('num_workers', [0, 1])
def test_resume_continues_with_the_unseen_batches(tmp_path, num_workers):
    cache = make_cache(tmp_path / 'c', 30)  # 7 batches of 4 per epoch: the run crosses epochs
    uninterrupted = fit(cache, 9, num_workers)
    assert len(uninterrupted) == 18
    first = fit(cache, 4, num_workers, save_to=tmp_path / 'last.ckpt')
    assert checkpoints.read_progress(tmp_path / "last.ckpt")[1] == 8
    second = fit(cache, 9, num_workers, ckpt_path=tmp_path / 'last.ckpt')
    assert first + second == uninterrupted  # no repeats, no skips
