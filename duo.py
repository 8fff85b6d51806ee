"""duo's Python API: load a checkpoint once, then draw samples, continue prompts and fill gaps.

    import duo
    model = duo.load('s-sahoo/duo-distilled')              # a hub id, a Hugging Face directory or a .ckpt
    duo.generate(model, ['The capital of France is'], steps=8)                 # continuations
    duo.generate(model, ['The capital of France is [GAP:5] .'], steps=8)       # infilling
    duo.generate(model, num_samples=2, steps=8, semi_ar=True, stride_length=512, num_strides=2)  # 2048 tokens
    duo.generate('s-sahoo/duo-distilled', ['The capital of France is'], steps=8)  # load and sample at once

load() reads the checkpoint the way `python main.py mode=sample_eval eval.checkpoint_path=...`
does (checkpoints.read_source / configure_from / load_model: the checkpoint's own algorithm,
sizes, noise schedule and tokenizer), and mode=sample_eval draws its samples through Model.sample.
Settings are the command line's keys: generate(..., steps=8, p_nucleus=0.9) sets sampling.steps and
sampling.p_nucleus for that call; load(..., **{'model.attn_backend': 'sdpa'}) any other key.
"""
import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

import checkpoints
import cli
import conditioning
import runtime
import samplers
import settings
from errors import ConfigError

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent / 'configs'


@dataclass
class Samples:
    """Sampled rows: token_ids[b] the whole row (truncated when sampling.var_length ends it early),
    fixed[b] which of its positions were given (the prompt or template; None: unconditional),
    templates[b] the row's template (None: unconditional)."""
    token_ids: list
    fixed: list | None
    templates: list | None
    tokenizer: object

    def texts(self, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(self.token_ids, skip_special_tokens=skip_special_tokens)

    def generated(self) -> list[list[bool]] | None:
        """Per row and position: True where the sampler drew the token (None: every token was drawn)."""
        return None if self.fixed is None else [[not f for f in row] for row in self.fixed]

    def generated_ids(self) -> list[list[int]]:
        """Per row, the drawn tokens in order (what entropy and letter statistics describe)."""
        if self.fixed is None:
            return self.token_ids
        return [[t for t, f in zip(ids, held) if not f] for ids, held in zip(self.token_ids, self.fixed)]

    def continuations(self) -> list[str]:
        """Per row, the text after the last given position (the prompt's continuation)."""
        starts = [_start(held) for held in self.fixed] if self.fixed else [0] * len(self.token_ids)
        return self.tokenizer.batch_decode([ids[s:] for ids, s in zip(self.token_ids, starts)])

    def infills(self) -> list[list[str]]:
        """Per row, the text drawn into each gap of its template (runs of free positions before its
        last given position)."""
        out = []
        for ids, held in zip(self.token_ids, self.fixed or [[False] * len(r) for r in self.token_ids]):
            gaps, k, end = [], 0, _start(held)
            while k < end:
                if held[k]:
                    k += 1
                    continue
                run = k
                while run < end and not held[run]:
                    run += 1
                gaps.append(self.tokenizer.decode(ids[k:run]))
                k = run
            out.append(gaps)
        return out

    def record(self) -> dict:
        """The samples' part of samples.json: generated_seqs and token_ids (whole rows) and, for
        prompted rows, prompts (the template text), continuations, infills (when a template has
        gaps) and fixed_spans (per row, the [start, end) runs of given positions)."""
        out = {'generated_seqs': self.texts(), 'token_ids': self.token_ids}
        if self.templates is not None:
            out['prompts'] = [t.text for t in self.templates]
            out['continuations'] = self.continuations()
            if not all(t.is_prefix for t in self.templates):
                out['infills'] = self.infills()
            out['fixed_spans'] = [spans(held) for held in self.fixed]
        return out


def _start(held) -> int:
    """One past the last given position of a row (0: none)."""
    return max((k + 1 for k, f in enumerate(held) if f), default=0)


def spans(held) -> list[list[int]]:
    """[start, end) runs of True in a row of bools."""
    out, k = [], 0
    while k < len(held):
        if held[k]:
            end = k
            while end < len(held) and held[end]:
                end += 1
            out.append([k, end])
            k = end
        else:
            k += 1
    return out


def flags_from_spans(fixed_spans, lengths) -> list[list[bool]]:
    """The inverse of spans: per row, True at the given positions (rows of `lengths` tokens)."""
    out = []
    for row, n in zip(fixed_spans, lengths):
        held = [False] * n
        for start, end in row:
            held[start:min(end, n)] = [True] * (min(end, n) - start)
        out.append(held)
    return out


class Model:
    """A loaded checkpoint: its resolved config, tokenizer and module (diffusion.Diffusion, eval mode,
    EMA weights unless eval.disable_ema) on `device`."""

    def __init__(self, config, tokenizer, module, device=None):
        self.config, self.tokenizer = config, tokenizer
        self.device = torch.device(device or ('cuda' if config.trainer.accelerator == 'gpu' else 'cpu'))
        self.module = module.to(self.device).eval()

    @property
    def algo(self) -> str:
        return str(self.config.algo.name)

    def width(self) -> int:
        """Tokens of one sample: model.length, or L + num_strides x stride_length with sampling.semi_ar."""
        sampling, length = self.config.sampling, int(self.config.model.length)
        if not sampling.semi_ar:
            return length
        try:
            samplers.check_semi_ar(length, sampling.stride_length, sampling.num_strides)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return samplers.semi_ar_length(length, int(sampling.stride_length), int(sampling.num_strides))

    def canvas(self, templates, rows: int):
        """(mask, tokens) (rows, width) of templates (row b: template b mod N); None without templates."""
        if templates is None:
            return None
        sampling = self.config.sampling
        note = (f' (model.length={self.config.model.length} + sampling.num_strides={sampling.num_strides} x '
                f'sampling.stride_length={sampling.stride_length})' if sampling.semi_ar
                else f' (model.length={self.config.model.length})')
        return conditioning.canvas(templates, rows, self.width(), causal=self.module.algo.causal, algo=self.algo,
                                   width_note=note)

    def sample(self, rows: int, templates=None, fixed=None, batch_size: int | None = None, generator=None,
               progress: bool = False) -> Samples:
        """`rows` samples, in batches of batch_size (default: all) split into blocks whose logits fit
        (runtime.sequences_per_block). templates: list of conditioning.Template (row b takes b mod
        N), or fixed = (mask, tokens) (rows, width) directly; sampling.* as configured."""
        if fixed is None:
            fixed = self.canvas(templates, rows)
        if templates is not None:
            templates = [templates[b % len(templates)] for b in range(rows)]
        length, width = int(self.config.model.length), self.width()
        batch_size = batch_size or rows
        block = runtime.sequences_per_block(self.device.type, length, self.module.vocab_size)
        token_ids, held = [], []
        batches = -(-rows // batch_size)
        for i, first in enumerate(range(0, rows, batch_size)):
            for start in range(first, min(first + batch_size, rows), block):
                end = min(start + block, first + batch_size, rows)
                part = None if fixed is None else (fixed[0][start:end].to(self.device),
                                                   fixed[1][start:end].to(self.device))
                ids, lengths = self._draw(end - start, part, width, generator, progress)
                for b, n in enumerate(lengths.tolist()):
                    token_ids.append(ids[b, :n].tolist())
                    held.append([] if part is None else part[0][b, :n].tolist())
            if progress:
                log.info('Sampled batch %d/%d', i + 1, batches)
        return Samples(token_ids, None if fixed is None else held, templates, self.tokenizer)

    def _draw(self, n: int, fixed, width: int, generator, progress):
        """(ids (n, width') on the CPU, lengths (n,)) of one block, SPEC-2 §15: one window, or
        semi-autoregressive windows; sampling.var_length ends rows at their first generated EOS
        (semi-AR: also at a low-entropy tail, and stops drawing windows once every row has ended)."""
        sampling, length = self.config.sampling, int(self.config.model.length)
        eos = self.tokenizer.eos_token_id
        start = (conditioning.generated_start(fixed[0]) if fixed is not None
                 else torch.zeros(n, dtype=torch.long, device=self.device))

        def window(held):
            return self.module.generate(n, length, generator=generator, progress=progress, fixed=held)

        if sampling.semi_ar:
            stop = (functools.partial(samplers.window_stop, eos_id=eos, start=start,
                                      vocab_size=self.module.vocab_size) if sampling.var_length else None)
            ids, lengths = samplers.sample_semi_ar(window, n, length, int(sampling.stride_length),
                                                   int(sampling.num_strides), fixed=fixed, stop=stop,
                                                   device=self.device)
        else:
            ids = window(fixed)
            lengths = torch.full((n,), width, dtype=torch.long, device=ids.device)
            if sampling.var_length:
                ended = samplers.eos_lengths(ids, eos, start)
                lengths = torch.where(ended < 0, lengths, ended)
        return ids.cpu(), lengths.cpu()

    def check(self):
        """The sampling settings are valid for this model (ConfigError otherwise)."""
        settings.check_sampling(self.config)
        self.module.algo.check(self.module)
        self.width()

    @contextlib.contextmanager
    def using(self, **values):
        """Sampling settings for the duration of a with-block: keys of sampling.* (steps=8) or any dotted
        key ('sampling.psi.high_mode'); restored afterwards; checked on entry."""
        changes = {_key(k): v for k, v in values.items() if v is not None}
        before = {k: OmegaConf.select(self.config, k) for k in changes}
        for key in changes:
            if OmegaConf.select(self.config, key, default='<missing>') == '<missing>':
                raise ConfigError(f"{key} is not a setting (misspelt?): see configs/config.yaml (e.g. steps=8)")
        try:
            with open_dict(self.config):
                for key, value in changes.items():
                    OmegaConf.update(self.config, key, value, merge=False)
            self.check()
            yield self
        finally:
            with open_dict(self.config):
                for key, value in before.items():
                    OmegaConf.update(self.config, key, value, merge=False)

    def generate(self, prompts=None, infill=None, num_samples: int = 1, seed: int | None = None,
                 skip_special_tokens: bool = True, **sampling) -> list[str]:
        """Texts (module function generate)."""
        return generate(self, prompts, infill, num_samples, seed, skip_special_tokens, **sampling)


# The configuration's top-level keys (configs/config.yaml and its groups): a setting given as a
# keyword that starts with none of them is a sampling.* key.
TOP_LEVEL = frozenset(OmegaConf.load(CONFIG_DIR / 'config.yaml')) | set(cli.GROUPS)


def _key(name: str) -> str:
    """steps -> 'sampling.steps', psi.high_mode -> 'sampling.psi.high_mode'; 'model.length' stays."""
    return name if name.split('.')[0] in TOP_LEVEL else f'sampling.{name}'


def from_config(config, explicit=frozenset()) -> Model:
    """The Model of config.eval.checkpoint_path, configured from the checkpoint (main.py's way)."""
    tokenizer, module = checkpoints.load_for_eval(config, explicit)
    return Model(config, tokenizer, module)


def compose(overrides=()) -> 'OmegaConf':
    """The resolved configuration of mode=sample_eval with command-line `overrides` (strings)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its own instance
        config = hydra_compose(config_name='config', overrides=['mode=sample_eval', *overrides])
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            config = hydra_compose(config_name='config', overrides=['mode=sample_eval', *overrides])
    return settings.resolve(config)


def load(checkpoint, *overrides: str, device: str | None = None, **values) -> Model:
    """A Model of `checkpoint` (a .ckpt, a Hugging Face directory or hub id), ready to sample.

    overrides: command-line strings ('model.attn_backend=sdpa'); values: settings as keywords
    (steps=8 is sampling.steps; dotted keys through **{'eval.disable_ema': True}); device: 'cpu',
    'cuda' (default: a GPU when there is one)."""
    values = {_key(k): v for k, v in values.items()}
    overrides = [*overrides, *(f'{k}={_hydra_value(v)}' for k, v in values.items())]
    if device is not None:
        overrides.append(f"trainer.accelerator={'cpu' if str(device) == 'cpu' else 'gpu'}")
    config = compose(overrides)
    with open_dict(config):
        config.eval.checkpoint_path = str(checkpoint)
    model = from_config(config, settings.explicit_keys(overrides))
    model.check()
    return model


def _hydra_value(value) -> str:
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace('\\', '\\\\').replace('"', '\\"') + '"'
    return str(value)


def generate(model, prompts=None, infill=None, num_samples: int = 1, seed: int | None = None,
             skip_special_tokens: bool = True, **sampling) -> list[str]:
    """Texts of the samples drawn by `model` (a Model, or a checkpoint to load first).

    prompts: a prompt / infilling template (conditioning: `[GAP:n]` marks n tokens to fill) or a list
    of them; infill: explicit fixed positions instead, a dict {position: text or [token ids]} or a
    list of them (nothing else is held: give position 0 the BOS id to start like a prompt);
    neither: unconditional samples. num_samples rows per prompt (row b continues prompt b mod N).
    seed: a seeded generator (reproducible). sampling: sampling.* settings for this call (steps=8,
    p_nucleus=0.9, semi_ar=True, stride_length=..., num_strides=..., var_length=True, ...).
    Returns the whole texts (prompt and continuation), special tokens removed unless
    skip_special_tokens=False; Model.sample gives prompts and continuations apart.
    """
    if not isinstance(model, Model):
        model = load(model)
    if prompts is not None and infill is not None:
        raise ConfigError('give prompts or infill, not both')
    templates = None
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        templates = [conditioning.parse(p, model.tokenizer, f'prompts[{k}]') for k, p in enumerate(prompts)]
    elif infill is not None:
        infill = [infill] if isinstance(infill, dict) else list(infill)
        templates = [conditioning.from_positions(spec, model.tokenizer, f'infill[{k}]') for k, spec in enumerate(infill)]
    rows = num_samples * (len(templates) if templates else 1)
    with model.using(**sampling):
        generator = None
        if seed is not None:
            generator = torch.Generator(model.device).manual_seed(int(seed))
        samples = model.sample(rows, templates, generator=generator)
    return samples.texts(skip_special_tokens=skip_special_tokens)
