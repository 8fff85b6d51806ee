"""Test configuration: offline, CPU, deterministic."""
import os
import sys
from pathlib import Path

# Hub calls must fail fast offline (otherwise transformers/datasets retry for over a minute).
for var, value in {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
                   'WANDB_MODE': 'offline', 'TOKENIZERS_PARALLELISM': 'false'}.items():
    os.environ.setdefault(var, value)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_CORPUS = ROOT.parent / 'shared' / 'corpus' / 'english.jsonl.gz'


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests (minutes); run in CI, deselect with -m "not slow"')
