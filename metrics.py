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


def sample_entropy(samples: torch.Tensor) -> float:
    """Mean over samples (N, L) of the entropy (nats) of each sample's token-id histogram (SPEC §7)."""
    if samples.dim() != 2 or samples.shape[1] == 0:
        raise ValueError(f"samples must be (N, L) token ids with L >= 1, got shape {tuple(samples.shape)}")
    entropies = []
    for row in samples.cpu():
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
    """

    def __init__(self, name_or_path: str, device=None, batch_size: int = 8, tokenizer=None):
        if batch_size < 1:
            raise ValueError(f"eval.perplexity_batch_size={batch_size} must be >= 1 (e.g. eval.perplexity_batch_size=8)")
        self.device = torch.device(device or 'cpu')
        self.batch_size = batch_size
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
        return self._windows(self._encode(text))

    def _windows(self, ids: list[int]) -> list[list[int]]:
        if self.eos_id in ids[1:]:
            ids = ids[:ids.index(self.eos_id, 1) + 1]
        stride = self.context - 1
        return [ids[start:start + self.context] for start in range(0, len(ids) - 1, stride)]

    @torch.no_grad()
    def score(self, texts: list[str], eos_token: str | None = None,
              token_ids: list[list[int]] | None = None) -> tuple[float, int]:
        """(total NLL in nats, number of counted targets) of texts; eos_token = the sampler's
        end-of-text string, replaced by the judge's when the two differ. token_ids: the sampled ids
        of the texts, which a judge reading the run's tokenizer scores as they are (re-tokenizing a
        decode need not give them back: text8's tokenizer merges runs of spaces)."""
        if token_ids is not None and self.reads_run_tokenizer:
            id_lists = [[t for t in ids if t != self.excluded_id] for ids in token_ids]
        else:
            if eos_token and eos_token != self.tokenizer.eos_token:
                texts = [text.replace(eos_token, self.tokenizer.eos_token) for text in texts]
            id_lists = [self._encode(text) for text in texts]
        windows = [w for ids in id_lists for w in self._windows(ids)]
        windows.sort(key=len)  # batches of similar lengths pad little
        total, count = 0.0, 0
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            width = len(batch[-1])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.long)
            for i, w in enumerate(batch):
                ids[i, :len(w)] = torch.tensor(w)
                valid[i, :len(w)] = 1
            ids, valid = ids.to(self.device), valid.to(self.device)
            with self._autocast():
                if self.excluded_id is None:
                    logits = self.model(input_ids=ids, attention_mask=valid).logits
                else:  # our causal DiT: right padding cannot affect the earlier positions
                    logits = self.model(ids)
                    logits[..., self.excluded_id] = float('-inf')
            for i, w in enumerate(batch):  # one row at a time: no (b, n, V) float32 copy
                n = len(w)
                nll = torch.nn.functional.cross_entropy(logits[i, :n - 1].float(), ids[i, 1:n], reduction='sum')
                total += nll.item()
                count += n - 1
        return total, count

    def compute(self, texts: list[str], eos_token: str | None = None,
                token_ids: list[list[int]] | None = None) -> float:
        """Generative perplexity exp(total NLL / counted targets) of texts (see score)."""
        total, count = self.score(texts, eos_token, token_ids)
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
    tokenizer = dataloader.load_tokenizer(tokenizer_name)
    scorer = GenerativePerplexity(judge, device=device, batch_size=batch_size, tokenizer=tokenizer)
    result['generative_ppl'] = scorer.compute(texts, eos_token=tokenizer.eos_token, token_ids=token_ids)
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
