"""Detokenizers of the zero-shot validation sets (SPEC §2), as upstream MDLM/DUO apply them.

WikiText, PTB, LM1B and the scientific papers are distributed pre-tokenized (spaces around
punctuation, "@-@" for hyphens, "N" for numbers, ...). Before GPT-2 tokenization these spaces are
undone so that the text looks like the web text the models were trained on; LAMBADA only gets its
curly quotes straightened. Each detokenizer is a table of rewriting steps applied in order: a
plain substring replacement, or a regular-expression substitution. The tables reproduce the
upstream behaviour (perplexities are comparable with the published ones), with one exception:
upstream's WikiText table has a step meant for numbers after an apostrophe that matches the
literal text "/' <digit>/" and writes "/'[0-9]/"; it is omitted here (it never fires on WikiText
and would corrupt text where it did).
"""
import re
from collections.abc import Callable

# (pattern, replacement, is_regex); a plain step replaces every occurrence, left to right.
_BRACKETS = (  # strip the spaces just inside matched pairs: "( a b )" -> "(a b)"
    (r'\(\s*([^\)]*?)\s*\)', r'(\1)', True),
    (r'\[\s*([^\]]*?)\s*\]', r'[\1]', True),
    (r'{\s*([^}]*?)\s*}', r'{\1}', True),
    (r'"\s*([^"]*?)\s*"', r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
)

WIKITEXT = (
    ("s '", "s'", False),            # plural possessive
    (' @-@ ', '-', False),           # hyphens and number separators
    (' @,@ ', ',', False),
    (' @.@ ', '.', False),
    (' : ', ': ', False),            # no space before punctuation
    (' ; ', '; ', False),
    (' . ', '. ', False),
    (' ! ', '! ', False),
    (' ? ', '? ', False),
    (' , ', ', ', False),
    *_BRACKETS,
    ('= = = =', '====', False),      # section headings
    ('= = =', '===', False),
    ('= =', '==', False),
    (' \u00b0 ', '\u00b0', False),   # degree sign
    (' \n', '\n', False),
    ('\n ', '\n', False),
    (' N ', ' 1 ', False),           # the number placeholder
    (" 's", "'s", False),
)

PTB = (
    (" 's", "'s", False),
    ("s ' ", "s' ", False),
    (" n't", "n't", False),
    (' \n ', '\n', False),
    ('\\/', '/', False),
    # "N N N": each replacement consumes the spaces its neighbours need, so repeat (upstream: 10 passes).
    *((' N ', ' 1 ', False),) * 10,
    ('$ 1', '$1', False),
    ('# 1', '#1', False),
    ('<unk>', '?', False),
)

LM1B = (
    ('http : / / ', 'http://', False),
    ('https : / / ', 'https://', False),
    (r" '(\w+)", r"'\1", True),            # contractions: "don 't" -> "don't"
    (r' (\w+) \. ', r' \1. ', True),       # full stops after a word
    (r' (\w+) \.$', r' \1.', True),
    (' ? ', '? ', False),
    (r' \?$', '?', True),
    (' ! ', '! ', False),
    (r' \!$', '!', True),
    (' , ', ', ', False),
    (' : ', ': ', False),
    (' ; ', '; ', False),
    (' / ', '/', False),
    (r'" ([^"]+) "', r'"\1"', True),       # quotes and brackets around a phrase
    (r"' ([^']+) '", r"'\1'", True),
    (r'\( ([^\(\)]+) \)', r'(\1)', True),
    (r'\[ ([^\[\]]+) \]', r'[\1]', True),
    ('$ ', '$', False),
    ('\u00a3 ', '\u00a3', False),          # pound sign
)


def _compile(table) -> Callable[[str], str]:
    steps = [(re.compile(p), r) if is_regex else (p, r) for p, r, is_regex in table]

    def detokenize(text: str) -> str:
        for pattern, replacement in steps:
            text = pattern.sub(replacement, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, replacement)
        return text
    return detokenize


wikitext = _compile(WIKITEXT)
ptb = _compile(PTB)
lm1b = _compile(LM1B)


def lambada(text: str) -> str:
    """Straight quotes; the passage starts on a new line (upstream prepends a newline)."""
    return '\n' + text.replace('\u201c', '"').replace('\u201d', '"').strip()


def scientific_papers(text: str) -> str:
    return lm1b(wikitext(text))


DETOKENIZERS = {'wikitext': wikitext, 'ptb': ptb, 'lm1b': lm1b, 'lambada': lambada,
                'scientific_papers': scientific_papers}


def get(name: str | None) -> Callable[[str], str] | None:
    """The detokenizer called `name` (None: none); an unknown name is a one-line error."""
    if name is None:
        return None
    if name not in DETOKENIZERS:
        raise ValueError(f'data.detokenizer={name} is unknown: use one of {", ".join(DETOKENIZERS)} '
                         f'or null (e.g. data.detokenizer=wikitext)')
    return DETOKENIZERS[name]
