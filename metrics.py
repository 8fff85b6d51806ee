"""Metrics (SPEC §7): the likelihood bound over a validation set, sample entropy and generative
perplexity.

val/nll is the mean per-token loss over every counted position of every sequence (nats),
val/ppl = exp(nll), val/bpd = nll / ln 2.
"""
import contextlib
import math

import torch
import torchmetrics


class NLLMetric(torchmetrics.Metric):
    """Token-weighted mean of per-token losses, summed across batches and DDP ranks in float64."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state('total', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')

    def update(self, weighted_losses: torch.Tensor, weights: torch.Tensor):
        """weighted_losses, weights (B, L): per-token loss times its weight (0 at excluded positions)."""
        self.total += weighted_losses.double().sum()
        self.count += weights.double().sum()

    def compute(self) -> tuple[float, float, float, int]:
        """(nll, ppl, bpd, tokens) over everything seen since the last reset."""
        count = self.count.item()
        nll = self.total.item() / count if count else float('nan')
        ppl = math.exp(nll) if nll < 700 else float('inf')
        return nll, ppl, nll / math.log(2), int(round(count))


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

    Each text is re-tokenized by the judge's tokenizer; the targets (every token after the first)
    are counted up to and including the first end-of-text token; texts longer than the judge's
    context are scored in windows of that length overlapping by one token, so that every target
    is predicted exactly once. PPL = exp(total NLL / total counted targets) over all texts.
    """

    def __init__(self, name_or_path: str, device=None, batch_size: int = 8):
        import transformers
        if batch_size < 1:
            raise ValueError(f"eval.perplexity_batch_size={batch_size} must be >= 1 (e.g. eval.perplexity_batch_size=8)")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"eval.gen_ppl_eval_model_name_or_path={name_or_path} cannot be loaded ({reason}); "
                             f"offline, pass a local directory written by save_pretrained "
                             f"(e.g. eval.gen_ppl_eval_model_name_or_path=/data/gpt2-large)") from None
        self.device = torch.device(device or 'cpu')
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.context = getattr(cfg, 'n_positions', None) or getattr(cfg, 'max_position_embeddings')
        self.eos_id = self.tokenizer.eos_token_id
        self.batch_size = batch_size

    def windows(self, text: str) -> list[list[int]]:
        """The judge's token windows of one text, cut after the first end-of-text target."""
        ids = self.tokenizer(text, verbose=False)['input_ids']
        if self.eos_id in ids[1:]:
            ids = ids[:ids.index(self.eos_id, 1) + 1]
        stride = self.context - 1
        return [ids[start:start + self.context] for start in range(0, len(ids) - 1, stride)]

    @torch.no_grad()
    def score(self, texts: list[str], eos_token: str | None = None) -> tuple[float, int]:
        """(total NLL in nats, number of counted targets) of texts; eos_token = the sampler's
        end-of-text string, replaced by the judge's when the two differ."""
        if eos_token and eos_token != self.tokenizer.eos_token:
            texts = [text.replace(eos_token, self.tokenizer.eos_token) for text in texts]
        windows = [w for text in texts for w in self.windows(text)]
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
                logits = self.model(input_ids=ids, attention_mask=valid).logits
            for i, w in enumerate(batch):  # one row at a time: no (b, n, V) float32 copy
                n = len(w)
                nll = torch.nn.functional.cross_entropy(logits[i, :n - 1].float(), ids[i, 1:n], reduction='sum')
                total += nll.item()
                count += n - 1
        return total, count

    def compute(self, texts: list[str], eos_token: str | None = None) -> float:
        """Generative perplexity exp(total NLL / counted targets) of texts."""
        total, count = self.score(texts, eos_token)
        if count == 0:
            raise ValueError('no text has a token to score after re-tokenization: the samples are empty')
        return math.exp(total / count)

    def _autocast(self):
        if self.device.type != 'cuda':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast('cuda', dtype=dtype)
