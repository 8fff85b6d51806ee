"""Prompts and infilling templates (SPEC-2 §15): text -> the canvas positions a sampler holds fixed.

A template is text in which `[GAP:n]` marks n positions to fill, e.g.
`The capital of France is [GAP:5] .`; a prompt is a template without gaps. Every template starts
with the tokenizer's BOS (position 0, as every training block does), then the token ids of its
text pieces, each tokenized on its own, with the gaps' free positions between them; the positions
after the template are free too (what a prompt's continuation fills). With a tokenizer that writes
a word's leading space inside the word's token (GPT-2's BPE), the whitespace just before a gap
marker is dropped: the gap's first token brings its own space. Character tokenizers keep it.

`sampling.prompt` (one template) or `sampling.prompts_file` (.txt: one per non-empty line; .jsonl:
one per line, a JSON string or an object with a "prompt" field) give the templates of a run; row
b of the samples takes template b mod N. Everything here is pure except reading the prompts file.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import ConfigError

GAP = re.compile(r'\[GAP:([^\]]*)\]')
EXAMPLE = 'The capital of France is [GAP:5] .'


@dataclass(frozen=True)
class Template:
    """A prompt or infilling template: ids[i] is the token held at canvas position i, None where
    the position is free (a gap); positions from len(ids) on are free. text: as the user wrote it
    (for explicit positions, a rendering with [GAP:n] markers); source: where it came from, for messages."""
    text: str
    ids: tuple
    source: str = 'sampling.prompt'

    @property
    def span(self) -> int:
        """Canvas positions the template covers (its BOS, text and gaps)."""
        return len(self.ids)

    @property
    def is_prefix(self) -> bool:
        """No held position after a free one: an autoregressive model can continue it."""
        free = [i is None for i in self.ids]
        return not any(free[k] and not free[k + 1] for k in range(len(free) - 1))


def merges_leading_space(tokenizer) -> bool:
    """Whether the tokenizer writes a word's leading space inside the word's token (GPT-2: ' a' is one token)."""
    return len(tokenizer.encode(' a', add_special_tokens=False)) == 1


def parse(text: str, tokenizer, source: str = 'sampling.prompt') -> Template:
    """The Template of `text` (module docstring): [BOS] + pieces and gaps."""
    text = str(text)
    strip_before_gap = merges_leading_space(tokenizer)
    ids = [tokenizer.bos_token_id]
    pieces = GAP.split(text)  # text, gap, text, gap, ..., text
    for k, piece in enumerate(pieces):
        if k % 2:
            try:
                n = int(piece)
            except ValueError:
                n = 0
            if n < 1 or str(n) != piece.strip():
                raise ConfigError(f"{source}: [GAP:{piece}] must give a whole number of positions >= 1 "
                                  f"(e.g. {source}=\"{EXAMPLE}\")")
            ids.extend([None] * n)
        else:
            if strip_before_gap and k + 1 < len(pieces):
                piece = piece.rstrip()
            if piece:
                ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    if '[GAP' in GAP.sub('', text):
        raise ConfigError(f"{source}: a gap marker is malformed; write [GAP:n] with n the positions to fill "
                          f"(e.g. {source}=\"{EXAMPLE}\")")
    return Template(text, tuple(ids), source)


def from_positions(positions: dict, tokenizer, source: str = 'infill') -> Template:
    """A Template from explicit fixed positions {canvas position: text or [token ids]}: each text's
    tokens (no BOS added) are held from its position on; every other position is free."""
    held = {}
    for start, value in sorted(positions.items()):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"{source}: positions must be integers >= 0, got {start!r} "
                              f"(e.g. {{0: [tokenizer.bos_token_id], 1: 'The capital of France is', 10: ' .'}})")
        ids = tokenizer.encode(value, add_special_tokens=False) if isinstance(value, str) else [int(i) for i in value]
        for offset, token in enumerate(ids):
            if start + offset in held:
                raise ConfigError(f"{source}: position {start + offset} is given twice")
            held[start + offset] = token
    span = max(held) + 1 if held else 0
    ids = tuple(held.get(i) for i in range(span))
    return Template(render(ids, tokenizer), ids, source)


def render(ids, tokenizer) -> str:
    """A template's text: its held pieces decoded, its gaps written [GAP:n]."""
    out, k = [], 0
    while k < len(ids):
        run = k
        while run < len(ids) and (ids[run] is None) == (ids[k] is None):
            run += 1
        out.append(f'[GAP:{run - k}]' if ids[k] is None else tokenizer.decode(list(ids[k:run])))
        k = run
    return ''.join(out)


def read_prompts_file(path) -> list[str]:
    """The prompts of a .txt (one per non-empty line) or .jsonl file (a JSON string, or an object
    with a "prompt" field, per line)."""
    setting = f'sampling.prompts_file={path}'
    p = Path(str(path))
    if p.suffix not in ('.txt', '.jsonl'):
        raise ConfigError(f"{setting} must be a .txt file (one prompt per line) or a .jsonl file (one JSON string "
                          f"or {{\"prompt\": ...}} per line) (e.g. sampling.prompts_file=prompts.txt)")
    if not p.is_file():
        raise ConfigError(f"{setting} does not exist: pass a .txt or .jsonl file of prompts "
                          f"(e.g. sampling.prompts_file=prompts.txt)")
    prompts = []
    for number, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == '.txt':
            prompts.append(line)
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if isinstance(value, dict):
            value = value.get('prompt')
        if not isinstance(value, str):
            raise ConfigError(f"{setting}: line {number} is neither a JSON string nor an object with a \"prompt\" "
                              f"string (e.g. {{\"prompt\": \"{EXAMPLE}\"}})")
        prompts.append(value)
    if not prompts:
        raise ConfigError(f"{setting} holds no prompt: write one prompt per line")
    return prompts


def from_settings(sampling, tokenizer) -> list[Template] | None:
    """The templates of sampling.prompt / sampling.prompts_file (None: unconditional sampling)."""
    prompt, path = sampling.prompt, sampling.prompts_file
    if prompt is not None and path is not None:
        raise ConfigError(f"sampling.prompt and sampling.prompts_file={path} are both set: give one "
                          f"(e.g. sampling.prompts_file=null)")
    if prompt is not None:
        return [parse(prompt, tokenizer)]
    if path is not None:
        return [parse(text, tokenizer, f'sampling.prompts_file={path} (prompt {k + 1})')
                for k, text in enumerate(read_prompts_file(path))]
    return None


def canvas(templates: list[Template], rows: int, width: int, *, causal: bool = False,
           algo: str = 'ar', width_note: str = '') -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (rows, width) bool, tokens (rows, width) int64): row b holds templates[b mod N].

    ConfigError when a template does not fit `width` positions (width_note says where the width
    comes from), or, for a causal model, when it has a gap followed by held text."""
    mask = torch.zeros(rows, width, dtype=torch.bool)
    tokens = torch.zeros(rows, width, dtype=torch.long)
    for k, template in enumerate(templates):
        if template.span > width:
            raise ConfigError(f"{template.source}: the template covers {template.span} positions (BOS and gaps "
                              f"included) but a sample has {width}{width_note}: shorten it or sample longer texts "
                              f"(sampling.semi_ar=true sampling.stride_length=... sampling.num_strides=...)")
        if causal and not template.is_prefix:
            raise ConfigError(f"{template.source}: algo={algo} generates left to right and cannot fill a gap "
                              f"followed by text: put the gap at the end, or use a diffusion model (e.g. algo=mdlm)")
        held = [i for i, token in enumerate(template.ids) if token is not None]
        values = torch.tensor([template.ids[i] for i in held], dtype=torch.long)
        for row in range(k, rows, len(templates)):
            mask[row, held] = True
            tokens[row, held] = values
    return mask, tokens


def generated_start(mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64: where each row's continuation begins, one past its last held position (0: none)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * positions).amax(1) if mask.shape[1] else mask.new_zeros(mask.shape[0], dtype=torch.long)
