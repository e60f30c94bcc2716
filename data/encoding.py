"""Parallel, order-preserving tokenization of document batches (the converter's hot path).

Worker processes import only this module, ``tokenizers`` and numpy (not Streaming or torch),
so they start in well under a second.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from data.sources import ChatDoc, Document, chat_pieces
from data.tokenizer import IM_END, IM_START


@dataclass
class Chunk:
    """A batch of consecutive documents, the unit of work sent to a tokenizer process."""

    first_index: int
    docs: list[Document]


def encode_chunk(
    tok: Tokenizer, docs: Sequence[Document], eot_id: int, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents into one flat array (each document followed by ``eot_id``) and lengths.

    ``tok.encode_special_tokens`` must be on: special-token text inside documents is data.
    Chat documents are encoded piece by piece with the ChatML ids placed between, which equals
    encoding the rendered ChatML string (added tokens split the text before pre-tokenization).
    """
    texts: list[str] = []
    for doc in docs:
        if isinstance(doc, ChatDoc):
            texts.extend(text for text, special in chat_pieces(doc.messages) if not special)
        else:
            texts.append(doc)
    encoded = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    if len(encoded) == len(docs):
        per_doc: list[list[int]] = encoded
    else:
        special_ids = {IM_START: tok.token_to_id(IM_START), IM_END: tok.token_to_id(IM_END)}
        pieces = iter(encoded)
        per_doc = []
        for doc in docs:
            if isinstance(doc, ChatDoc):
                ids: list[int] = []
                for text, special in chat_pieces(doc.messages):
                    if special:
                        ids.append(special_ids[text])
                    else:
                        ids.extend(next(pieces))
                per_doc.append(ids)
            else:
                per_doc.append(next(pieces))
    lengths = np.fromiter((len(ids) + 1 for ids in per_doc), np.int64, count=len(per_doc))
    body = np.fromiter(itertools.chain.from_iterable(per_doc), dtype, count=int(lengths.sum()) - len(per_doc))
    flat = np.insert(body, np.cumsum(lengths - 1), eot_id)
    return flat, lengths


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eot_id: int, dtype: str, threads: int) -> None:
    # The Rust thread pool reads RAYON_NUM_THREADS on first use: split the cores between workers.
    # A spawned worker has no fork hazard, so parallelism is on even where the user turned it off.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    _WORKER.update(tok=tok, eot_id=eot_id, dtype=dtype)


def _worker_encode(docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_WORKER["tok"], docs, _WORKER["eot_id"], _WORKER["dtype"])


def encoded_in_order(
    chunks: Iterable[Chunk], tok: Tokenizer, eot_id: int, dtype: str, workers: int
) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
    """Encode chunks in ``workers`` processes, yielding results in input order.

    At most two chunks per worker are in flight, so memory stays bounded however large the
    corpus (``Pool.imap`` would read the whole input ahead).
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), eot_id, dtype, threads)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_worker_encode, (chunk.docs,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield (done, *result.get())
        while pending:
            done, result = pending.popleft()
            yield (done, *result.get())
