"""Data pipeline: tokenizer training, corpora to MDS shards, per-phase mixtures, the streaming loader.

- ``tokenizer.py`` / ``train_tokenizer.py``: byte-level BPE with end-of-text, padding and ChatML tokens.
- ``sources.py``: reading text, JSON Lines, Parquet, ``datasets`` folders and chat data.
- ``encoding.py`` / ``convert.py``: parallel tokenization and packing into MDS shards.
- ``mixture.py`` / ``loader.py``: per-phase stream mixtures and the resumable Composer loader.
- ``demo_corpus.py``: the offline demo corpus from the Python standard library.
"""
