"""Metrics of samples (SPEC §7): sample entropy and generative perplexity under a judge model.

(The likelihood bound, val/nll, is aggregated during validation: diffusion.NLLMetric.)
"""
import contextlib
import json
import math
import re
import sys
from pathlib import Path

import torch

import checkpoints


def sample_entropy(samples) -> float:
    """Mean over samples (N, L) of the entropy (nats) of each sample's token-id histogram (SPEC §7).

    samples may also be a list of rows of different lengths (the generated tokens of prompted or
    variable-length samples); empty rows are left out."""
    if isinstance(samples, torch.Tensor):
        if samples.dim() != 2 or samples.shape[1] == 0:
            raise ValueError(f"samples must be (N, L) token ids with L >= 1, got shape {tuple(samples.shape)}")
        rows = list(samples.cpu())
    else:
        rows = [torch.as_tensor(row, dtype=torch.long) for row in samples if len(row)]
        if not rows:
            raise ValueError("samples hold no token: no entropy")
    entropies = []
    for row in rows:
        counts = row.unique(return_counts=True)[1].double()
        probs = counts / counts.sum()
        entropies.append(-(probs * probs.log()).sum().item())
    return sum(entropies) / len(entropies)


class GenerativePerplexity:
    """Perplexity of generated texts under a judge causal LM (SPEC §7); the judge is loaded once.

    The judge is a Hugging Face causal LM (hub id or save_pretrained directory) with its own
    tokenizer, or one of our AR models (an algo=ar .ckpt, EMA weights when it has them, or a
    directory written by models.hf_format.save_hf of a causal DiT), which reads the run's
    `tokenizer` and never predicts the extra id (SPEC §1): that id is dropped from the texts, as a
    GPT-2 decode drops it; given the sampled token ids it scores those instead of re-tokenizing the
    texts. Otherwise each text is re-tokenized by the judge's tokenizer; the targets (every
    token after the first) are counted up to and including the first end-of-text token; texts
    longer than the judge's context are scored in windows of that length overlapping by one token,
    so that every target is predicted exactly once. PPL = exp(total NLL / total counted targets).

    Prompted samples (SPEC-2 §15): given per-token flags `generated`, only the generated tokens
    are counted as targets; the given ones (prompt, template) are the judge's context. A judge
    with its own tokenizer reads each run of given or generated tokens decoded and re-tokenized
    on its own, so that the flags carry over (a boundary may tokenize differently than in the
    whole text).
    """

    def __init__(self, name_or_path: str, device=None, batch_size: int = 8, tokenizer=None):
        if batch_size < 1:
            raise ValueError(f"eval.perplexity_batch_size={batch_size} must be >= 1 (e.g. eval.perplexity_batch_size=8)")
        self.device = torch.device(device or 'cpu')
        self.batch_size = batch_size
        self.run_tokenizer = tokenizer
        self.excluded_id = None
        self.reads_run_tokenizer = is_our_checkpoint(str(name_or_path))
        if self.reads_run_tokenizer:
            self._load_ours(str(name_or_path), tokenizer)
        else:
            self._load_hf(str(name_or_path))
        self.eos_id = self.tokenizer.eos_token_id

    def _load_hf(self, name_or_path: str):
        import transformers
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"eval.gen_ppl_eval_model_name_or_path={name_or_path} cannot be loaded ({reason}); "
                             f"offline, pass a local directory written by save_pretrained "
                             f"(e.g. eval.gen_ppl_eval_model_name_or_path=/data/gpt2-large) or an AR checkpoint "
                             f"of this project (outputs/.../checkpoints/last.ckpt)") from None
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.context = getattr(cfg, 'n_positions', None) or getattr(cfg, 'max_position_embeddings')
        self._encode = lambda text: self.tokenizer(text, verbose=False)['input_ids']

    def _load_ours(self, path: str, tokenizer):
        from dataloader import model_vocab
        setting = f"eval.gen_ppl_eval_model_name_or_path={path}"
        if tokenizer is None:
            raise ValueError(f"{setting} is a checkpoint of this project: scoring with it needs the run's tokenizer "
                             f"(GenerativePerplexity(..., tokenizer=...))")
        source = checkpoints.read_source(path, 'eval.gen_ppl_eval_model_name_or_path')
        if not source.causal:
            raise ValueError(f"{setting} is a diffusion model: the judge must be an AR model "
                             f"(a checkpoint of algo=ar, or a Hugging Face causal LM)")
        expected_vocab, self.excluded_id = model_vocab(tokenizer)
        if source.vocab_size != expected_vocab:
            raise ValueError(f"{setting} predicts {source.vocab_size} ids but the run's tokenizer gives "
                             f"{expected_vocab}: use an AR model trained with the same data.tokenizer_name_or_path")
        model, _ = checkpoints.load_backbone(path, 'eval.gen_ppl_eval_model_name_or_path', source)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.context = tokenizer, model.max_length
        specials = special_token_ids(tokenizer)
        pattern = re.compile('(' + '|'.join(map(re.escape, sorted(specials, key=len, reverse=True))) + ')') \
            if specials else None

        def encode(text):
            pieces = pattern.split(text) if pattern else [text]
            ids = []
            for i, piece in enumerate(pieces):  # odd pieces are the special tokens themselves
                if i % 2:
                    ids.append(specials[piece])
                elif piece:
                    ids.extend(tokenizer.encode(piece, add_special_tokens=False))
            return [t for t in ids if t != self.excluded_id]
        self._encode = encode

    def windows(self, text: str) -> list[list[int]]:
        """The judge's token windows of one text, cut after the first end-of-text target."""
        return [ids for ids, _ in self._windows(self._encode(text))]

    def _windows(self, ids: list[int], counted: list[bool] | None = None) -> list[tuple[list[int], list[bool]]]:
        """(ids, counted) windows of one text: counted[j] says whether ids[j] is a scored target."""
        counted = [True] * len(ids) if counted is None else counted
        if self.eos_id in ids[1:]:
            end = ids.index(self.eos_id, 1) + 1
            ids, counted = ids[:end], counted[:end]
        stride = self.context - 1
        return [(ids[start:start + self.context], counted[start:start + self.context])
                for start in range(0, len(ids) - 1, stride)]

    def _runs(self, token_ids: list[int], generated: list[bool], eos_token) -> tuple[list[int], list[bool]]:
        """A judge with its own tokenizer: the runs of given / generated run-tokenizer ids, each
        decoded and re-tokenized, with their flags."""
        if self.run_tokenizer is None:
            raise ValueError('scoring prompted samples with a judge of its own tokenizer needs the run\'s tokenizer '
                             '(GenerativePerplexity(..., tokenizer=...))')
        ids, flags, k = [], [], 0
        while k < len(token_ids):
            end = k
            while end < len(token_ids) and generated[end] == generated[k]:
                end += 1
            text = self.run_tokenizer.decode(token_ids[k:end])
            if eos_token and eos_token != self.tokenizer.eos_token:
                text = text.replace(eos_token, self.tokenizer.eos_token)
            piece = self._encode(text)
            if k > 0 and piece and piece[0] == self.tokenizer.bos_token_id and self.tokenizer.bos_token_id is not None \
                    and self.tokenizer.bos_token_id != self.eos_id:
                piece = piece[1:]  # a tokenizer that adds a BOS to every call: once, at the start
            ids.extend(piece)
            flags.extend([generated[k]] * len(piece))
            k = end
        return ids, flags

    @torch.no_grad()
    def score(self, texts: list[str], eos_token: str | None = None,
              token_ids: list[list[int]] | None = None,
              generated: list[list[bool]] | None = None) -> tuple[float, int]:
        """(total NLL in nats, number of counted targets) of texts; eos_token = the sampler's
        end-of-text string, replaced by the judge's when the two differ. token_ids: the sampled ids
        of the texts, which a judge reading the run's tokenizer scores as they are (re-tokenizing a
        decode need not give them back: text8's tokenizer merges runs of spaces). generated (with
        token_ids): per token, True where the sampler drew it; only those are counted, the others
        (a prompt) are context (class docstring)."""
        if generated is not None and token_ids is None:
            raise ValueError('generated flags need the token_ids they describe')
        if token_ids is not None and self.reads_run_tokenizer:
            flags = generated or [[True] * len(ids) for ids in token_ids]
            pairs = [([t for t in ids if t != self.excluded_id], [f for t, f in zip(ids, flag) if t != self.excluded_id])
                     for ids, flag in zip(token_ids, flags)]
        elif generated is not None:
            pairs = [self._runs(ids, flag, eos_token) for ids, flag in zip(token_ids, generated)]
        else:
            if eos_token and eos_token != self.tokenizer.eos_token:
                texts = [text.replace(eos_token, self.tokenizer.eos_token) for text in texts]
            pairs = [(ids, None) for ids in (self._encode(text) for text in texts)]
        windows = [w for ids, flags in pairs for w in self._windows(ids, flags)]
        windows.sort(key=lambda w: len(w[0]))  # batches of similar lengths pad little
        total, count = 0.0, 0
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            width = len(batch[-1][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (w, _) in enumerate(batch):
                ids[i, :len(w)] = torch.tensor(w)
                valid[i, :len(w)] = 1
            ids, valid = ids.to(self.device), valid.to(self.device)
            with self._autocast():
                if self.excluded_id is None:
                    logits = self.model(input_ids=ids, attention_mask=valid).logits
                else:  # our causal DiT: right padding cannot affect the earlier positions
                    logits = self.model(ids)
                    logits[..., self.excluded_id] = float('-inf')
            for i, (w, counted) in enumerate(batch):  # one row at a time: no (b, n, V) float32 copy
                n = len(w)
                nll = torch.nn.functional.cross_entropy(logits[i, :n - 1].float(), ids[i, 1:n], reduction='none')
                keep = torch.tensor(counted[1:n], dtype=torch.bool, device=nll.device)
                total += nll[keep].sum().item()
                count += int(keep.sum())
        return total, count

    def compute(self, texts: list[str], eos_token: str | None = None,
                token_ids: list[list[int]] | None = None, generated: list[list[bool]] | None = None) -> float:
        """Generative perplexity exp(total NLL / counted targets) of texts (see score)."""
        total, count = self.score(texts, eos_token, token_ids, generated)
        if count == 0:
            raise ValueError('no text has a token to score after re-tokenization: the samples are empty')
        return math.exp(total / count)

    def _autocast(self):
        if self.device.type != 'cuda':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast('cuda', dtype=dtype)


def is_our_checkpoint(path: str) -> bool:
    """A file (a Lightning .ckpt: Hugging Face models are directories or hub ids), or a directory in
    our Hugging Face layout (config.json with the DiT sizes, models/hf_format.py)."""
    p = Path(path)
    if p.is_file():
        return True
    if (p / 'config.json').is_file():
        from models.hf_format import REQUIRED_KEYS
        try:
            config = json.loads((p / 'config.json').read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and all(k in config for k in REQUIRED_KEYS)
    return False


def special_token_ids(tokenizer) -> dict[str, int]:
    """{string: id} of the tokenizer's named special tokens (bos, eos, pad, mask, unk, cls, sep), so
    that decoded samples re-tokenize to the same special ids (a character tokenizer would spell them)."""
    specials = {}
    for name in ('bos', 'eos', 'pad', 'mask', 'unk', 'cls', 'sep'):
        token, token_id = getattr(tokenizer, f'{name}_token', None), getattr(tokenizer, f'{name}_token_id', None)
        if isinstance(token, str) and token and token_id is not None:
            specials[token] = int(token_id)
    return specials


def judge_samples(samples_json, judge: str, batch_size: int = 8, device=None) -> float:
    """Score the samples a sample_eval run saved (samples.json) with `judge`, and record the
    generative perplexity in the file: how samples drawn offline are judged later."""
    import dataloader
    from atomic import write_text
    path = Path(samples_json)
    try:
        result = json.loads(path.read_text())
        texts, token_ids, tokenizer_name = result['generated_seqs'], result.get('token_ids'), result['tokenizer']
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f'{path} is not a samples.json of mode=sample_eval ({type(e).__name__}: {e})') from None
    generated = None
    if result.get('fixed_spans') is not None and token_ids is not None:  # prompted: the continuations given the prompts
        from duo import flags_from_spans
        generated = [[not f for f in row] for row in flags_from_spans(result['fixed_spans'], map(len, token_ids))]
    tokenizer = dataloader.load_tokenizer(tokenizer_name)
    scorer = GenerativePerplexity(judge, device=device, batch_size=batch_size, tokenizer=tokenizer)
    result['generative_ppl'] = scorer.compute(texts, eos_token=tokenizer.eos_token, token_ids=token_ids,
                                              generated=generated)
    result['judge'] = judge
    write_text(path, json.dumps(result, indent=2))
    return result['generative_ppl']


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description='Generative perplexity of the samples in a samples.json written by '
                                                 'mode=sample_eval (e.g. drawn offline): scored by --judge and '
                                                 'recorded in the file.')
    parser.add_argument('samples_json')
    parser.add_argument('--judge', default='gpt2-large',
                        help='a Hugging Face causal LM (hub id or local directory) or an AR checkpoint of this project')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    try:
        ppl = judge_samples(args.samples_json, args.judge, args.batch_size, args.device)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'generative perplexity {ppl:.3f} under {args.judge}; recorded in {args.samples_json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
