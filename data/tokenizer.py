"""The byte-level BPE tokenizer: special tokens, training, saving, loading and identity.

Byte-level BPE (GPT-2's scheme, as Mambaoutai uses) needs no unknown token: every byte has
an id, so French accents, emoji and code whitespace round-trip exactly. No normalizer is
set for the same reason. Special tokens take the first ids, in this order:

- ``<|endoftext|>``: appended after every document; packed samples reset positions after it.
- ``<|pad|>``: fills the last sample of a split; its labels are ignored (-100).
- ``<|im_start|>`` / ``<|im_end|>``: ChatML turn delimiters for instruction data.

A tokenizer's *fingerprint* hashes what decides the ids (model, pre-tokenizer, normalizer,
added tokens), not the JSON layout, so shards can be matched to the tokenizer a run uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.io import atomic_dir

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOT, PAD, IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant", "tool")

# The same rendering as data.sources.chat_pieces, for transformers' apply_chat_template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the converter records about a tokenizer and the loader checks against."""

    fingerprint: str
    vocab_size: int
    eot_id: int
    pad_id: int

    def to_dict(self) -> dict[str, str | int]:
        return {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
        }


def build_trainer(
    vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> trainers.BpeTrainer:
    """A BPE trainer whose alphabet is all 256 byte symbols, so no byte is ever unknown."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {floor} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (GPT-2 pre-tokenization regex, no prefix space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Train byte-level BPE on ``texts``; special tokens get ids 0..3 in SPECIAL_TOKENS order.

    ``show_progress`` draws the tokenizers library's own progress bars (counting pairs, merging).
    """
    tok = new_tokenizer()
    tok.train_from_iterator(texts, trainer=build_trainer(vocab_size, min_frequency, show_progress))
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, overwrite: bool = False) -> None:
    """Write ``tokenizer.json`` and the files ``AutoTokenizer.from_pretrained`` loads offline.

    ``clean_up_tokenization_spaces`` is off: it would rewrite " ." to "." on decode and break
    the exact round trip. The ChatML chat template is set so ``apply_chat_template`` renders
    conversations exactly as the converter does.
    """
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        hf_tok.save_pretrained(str(tmp))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a tokenizer folder (or the file itself)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected a folder with tokenizer.json "
            "(train one with `python -m data.train_tokenizer`)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a bad file
        raise ValueError(
            f"{file} is not a readable tokenizer ({exc}): train one with `python -m data.train_tokenizer` "
            "or copy it again"
        ) from exc


def vocabulary_size(tok: Tokenizer | str | Path) -> int:
    """How many token ids a tokenizer (or the tokenizer folder ``tok`` names) produces, added special
    tokens included: the count the model's vocabulary, the data checks and evaluation compare against."""
    if isinstance(tok, (str, Path)):
        tok = load_tokenizer(tok)
    return tok.get_vocab_size(with_added_tokens=True)


def fingerprint(tok: Tokenizer) -> str:
    """SHA-256 of the parts of the tokenizer that decide token ids, in canonical JSON."""
    spec = json.loads(tok.to_str())
    relevant = {key: spec.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def tokenizer_info(tok: Tokenizer) -> TokenizerInfo:
    eot_id, pad_id = tok.token_to_id(EOT), tok.token_to_id(PAD)
    if eot_id is None or pad_id is None:
        raise ValueError(
            f"the tokenizer lacks the special tokens {EOT} and {PAD}; train it with data.train_tokenizer"
        )
    return TokenizerInfo(fingerprint(tok), vocabulary_size(tok), eot_id, pad_id)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id (uint16 up to 65,536 tokens)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Encode plain-text documents the way the converter does: special-token text is data.

    ``encode_special_tokens`` makes a literal "<|endoftext|>" inside a document encode as
    ordinary bytes, so an end-of-text id only ever marks a real document end.
    """
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch_fast(list(texts), add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = previous
