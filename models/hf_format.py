"""Released Hugging Face checkpoints (SPEC §8): read and write them without remote code.

Layout (s-sahoo/duo, s-sahoo/duo-distilled, kuleshov-group/mdlm-owt): a directory with
config.json (hidden_dim, cond_dim, n_blocks, n_heads, vocab_size, model_length, ...) and the
backbone weights, EMA already applied, with the DiT keys of SPEC §8 under 'backbone.', in
model.safetensors, sharded safetensors (model.safetensors.index.json) or pytorch_model.bin.
Hub ids are fetched with huggingface_hub.snapshot_download (config and weights only); nothing in
the repository is executed.
"""
import json
from pathlib import Path

import torch

from atomic import atomic_write
from errors import CheckpointError

PREFIX = 'backbone.'  # the Lightning module's attribute holding the DiT (SPEC §8)

REQUIRED_KEYS = ('vocab_size', 'model_length', 'hidden_dim', 'cond_dim', 'n_blocks', 'n_heads')
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')


def resolve(path_or_hub_id: str, setting: str = 'eval.checkpoint_path') -> Path:
    """A local directory as is; a hub id ('owner/name') downloaded to the Hugging Face cache."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=['*.json', '*.safetensors', '*.bin']))
    except Exception as e:  # offline, unknown repository, gated, network errors: all end here
        raise CheckpointError(
            f"{setting}={path_or_hub_id} is not a local directory and the Hugging Face hub cannot "
            f"provide it ({type(e).__name__}); offline, download it elsewhere (huggingface-cli download "
            f"{path_or_hub_id} --local-dir DIR), copy DIR here and pass {setting}=DIR") from None


def read_config(directory: Path) -> dict:
    file = directory / 'config.json'
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e}); a Hugging Face checkpoint "
                              f"directory needs a config.json with {', '.join(REQUIRED_KEYS)}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise CheckpointError(f"{file} lacks integer {', '.join(missing)}: not a DUO/MDLM checkpoint config "
                              f"(needs {', '.join(REQUIRED_KEYS)})")
    return config


def read_weights(directory: Path) -> dict:
    """The full state dict (keys as stored) from the first weight file present."""
    file = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if file is None:
        raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    try:
        if file.name == 'pytorch_model.bin':
            return torch.load(file, map_location='cpu', weights_only=True)
        from safetensors.torch import load_file
        if file.name == 'model.safetensors':
            return load_file(file)
        shards = sorted(set(json.loads(file.read_text())['weight_map'].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    except Exception as e:  # truncated or corrupted files raise many different types
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {str(e)[:200]}); the download is "
                              f"incomplete or corrupted: download it again") from None


def load_hf(path_or_hub_id: str, setting: str = 'eval.checkpoint_path') -> tuple[dict, dict]:
    """(config.json as a dict, backbone state_dict without the 'backbone.' prefix), shapes checked
    against the config."""
    directory = resolve(path_or_hub_id, setting)
    config = read_config(directory)
    full = read_weights(directory)
    state_dict = {k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}
    if not state_dict:
        raise CheckpointError(f"{directory} has no '{PREFIX}*' weights: not a DUO/MDLM checkpoint")
    _check_against_config(state_dict, config, directory)
    if 'rotary_emb.inv_freq' not in state_dict:  # a non-persistent buffer in some exports: derived, not learnt
        head_dim = config['hidden_dim'] // config['n_heads']
        state_dict['rotary_emb.inv_freq'] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return config, state_dict


def _check_against_config(state_dict: dict, config: dict, directory: Path):
    where = f"{directory}/config.json"
    embedding = state_dict.get('vocab_embed.embedding')
    if embedding is None:
        raise CheckpointError(f"{directory} has no {PREFIX}vocab_embed.embedding: not a DiT checkpoint")
    expected = (config['vocab_size'], config['hidden_dim'])
    if tuple(embedding.shape) != expected:
        raise CheckpointError(f"{where} says vocab_size={expected[0]}, hidden_dim={expected[1]} but the weights "
                              f"have an embedding of shape {tuple(embedding.shape)}: config and weights do not match")
    blocks = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
    if blocks != config['n_blocks']:
        raise CheckpointError(f"{where} says n_blocks={config['n_blocks']} but the weights have {blocks} blocks: "
                              f"config and weights do not match")
    sigma = state_dict.get('sigma_map.mlp.0.weight')
    if sigma is not None and sigma.shape[0] != config['cond_dim']:
        raise CheckpointError(f"{where} says cond_dim={config['cond_dim']} but the weights have {sigma.shape[0]}: "
                              f"config and weights do not match")
    if config['hidden_dim'] % config['n_heads']:
        raise CheckpointError(f"{where}: hidden_dim={config['hidden_dim']} is not a multiple of "
                              f"n_heads={config['n_heads']}")
    inv_freq = state_dict.get('rotary_emb.inv_freq')
    head_dim = config['hidden_dim'] // config['n_heads']
    if inv_freq is not None and 2 * inv_freq.numel() != head_dim:
        raise CheckpointError(f"{where} says n_heads={config['n_heads']} (head size {head_dim}) but the rotary "
                              f"buffer is for head size {2 * inv_freq.numel()}: config and weights do not match")


def model_settings(hf_config: dict) -> dict:
    """Our model.* settings (and the vocabulary size) for a released config, e.g. for algo.backbone=hf_dit."""
    missing = [k for k in REQUIRED_KEYS if k not in hf_config]
    if missing:
        raise CheckpointError(f"the Hugging Face config lacks {', '.join(missing)}")
    return {'hidden_size': hf_config['hidden_dim'], 'cond_dim': hf_config['cond_dim'],
            'n_blocks': hf_config['n_blocks'], 'n_heads': hf_config['n_heads'],
            'length': hf_config['model_length'], 'vocab_size': hf_config['vocab_size']}


def save_hf(backbone: torch.nn.Module, directory, model_type: str = 'duo', time_conditioning: bool = True,
            extra: dict | None = None) -> Path:
    """Write `backbone` (a models.dit.DiT, its current weights: apply the EMA first) in the released
    layout: config.json + model.safetensors with keys under 'backbone.'. Returns the directory."""
    from safetensors.torch import save
    directory = Path(directory)
    config = {'model_type': model_type, 'vocab_size': backbone.vocab_size, 'model_length': backbone.max_length,
              'hidden_dim': backbone.hidden_size, 'cond_dim': backbone.cond_dim, 'n_blocks': backbone.n_blocks,
              'n_heads': backbone.n_heads, 'dropout': backbone.dropout, 'causal': backbone.causal,
              'time_conditioning': time_conditioning and not backbone.causal, **(extra or {})}
    tensors = {PREFIX + k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic_write(directory / 'model.safetensors', lambda f: f.write(save(tensors, metadata={'format': 'pt'})))
    atomic_write(directory / 'config.json', lambda f: f.write(json.dumps(config, indent=2) + '\n'), mode='w')
    return directory
