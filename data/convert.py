"""Convert corpora to MosaicML Streaming (MDS) shards of packed, fixed-length token samples.

    python -m data.convert --source path=corpus/en.jsonl.zst --tokenizer runs/tok \\
        --out runs/mds/en --seq-len 2048 --val-fraction 0.005 --workers 2

Documents are tokenized, an end-of-text id appended to each, and the token stream cut into
samples of ``seq_len + 1`` tokens (inputs are tokens [0:L], labels tokens [1:L+1]). Each
sample stores, beside its tokens (uint16 when the vocabulary fits, else uint32), the offset
of its first token within its document; with the end-of-text ids this gives every token's
position in its document, which positional loss weighting needs. The last sample of a split
is padded with the pad id (the loader masks those labels).

Speed: tokenization is the bottleneck, so documents go to the tokenizer in large batches
(``encode_batch_fast``, parallel in Rust) in worker processes, while this process reads the
sources and writes shards. Batches are formed here, independently of the worker count, and
their results consumed in order, so the output is byte-identical for any ``--workers``.

Safety: everything is written into a temporary folder that is renamed onto ``--out`` only
when complete (``stats.json`` included), so an interrupted run leaves nothing that looks
finished and re-running it neither duplicates nor loses documents.

Object stores: ``--out s3://bucket/mds/en`` (also ``gs://``, ``oci://``, ...; ``S3_ENDPOINT_URL``
for S3-compatible stores) converts into a local temporary folder, then uploads it with
Streaming's own uploader (``streaming.base.storage.CloudUploader``): shards first, each split's
``index.json`` after its shards and ``stats.json`` last, so a reader never finds an index whose
shards are missing. The loader reads such a stream with ``remote:`` in the mixture.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from streaming.base.util import bytes_to_int
from tqdm import tqdm

from common import cli, failpoints
from common.io import atomic_dir, atomic_write_text, check_output_path
from data.encoding import Chunk, encoded_in_order
from data.sources import BadRecords, SourceSpec, iter_documents, parse_source
from data.tokenizer import TokenizerInfo, load_tokenizer, token_dtype, tokenizer_info

META_KEY = "mamba_recipes"  # our key in each split's index.json (Streaming reads only "shards")
SHARD_HASHES = ["sha1", "xxh64"]
CHECKSUM_COLUMN = "crc32"  # per sample; verified on every read (data/loader.py)


def sample_checksum(tokens: np.ndarray, doc_offset: int) -> int:
    """CRC-32 of a stored sample: its token bytes, then its document offset (4 bytes, little-endian).

    Streaming checks a shard's hash only when it unpacks the compressed file; a flipped bit in the
    unpacked shard it then reads for the rest of the run would train silently. Checking it costs a
    few microseconds per 8 KB sample (``make bench-data`` prints it beside the loader's throughput).
    """
    return zlib.crc32(doc_offset.to_bytes(4, "little"), zlib.crc32(np.ascontiguousarray(tokens).data))


_MAX_LISTED_BAD = 1000


@dataclass
class ConvertConfig:
    """One conversion: sources -> one stream folder with ``train/``, ``val/`` and ``stats.json``."""

    sources: list[SourceSpec]
    tokenizer: str
    out: str
    seq_len: int = 2048
    val_fraction: float = 0.005
    split_seed: int = 0
    workers: int = 1
    batch_bytes: int = 1 << 20  # text per tokenizer call; large batches keep all threads busy
    shard_size: str = "64mb"
    skip_bad: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("no source given: pass at least one --source")
        if self.seq_len < 1:
            raise ValueError(f"--seq-len={self.seq_len} must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction={self.val_fraction} must be in [0, 1)")
        if self.workers < 1:
            raise ValueError(f"--workers={self.workers} must be >= 1")
        if self.batch_bytes < 1:
            raise ValueError(f"--batch-bytes={self.batch_bytes} must be >= 1")
        try:
            size = bytes_to_int(self.shard_size)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(
                f"--shard-size={self.shard_size!r} is not a size: write a number of bytes with an optional "
                "unit, e.g. 64mb, 512kb or 1gb"
            )


# ---------------------------------------------------------------------------------------------
# Packing and writing (this process)


@dataclass
class _SplitWriter:
    """Packs one split's token stream into ``seq_len + 1`` samples and writes them to MDS."""

    out: Path
    seq_len: int
    dtype: str
    eot_id: int
    pad_id: int
    shard_size: str
    documents: int = 0
    tokens: int = 0
    samples: int = 0
    padding_tokens: int = 0
    _buffer: np.ndarray = field(init=False)
    _offset: int = 0  # position in its document of _buffer[0]
    _writer: Any = field(init=False, default=None)  # a streaming.MDSWriter once a sample exists

    def __post_init__(self) -> None:
        self._buffer = np.empty(0, dtype=self.dtype)

    @property
    def sample_len(self) -> int:
        return self.seq_len + 1

    def add(self, tokens: np.ndarray, documents: int) -> None:
        """Append whole documents (each ending in end-of-text) and write every full sample."""
        self.documents += documents
        self.tokens += len(tokens)
        buf = np.concatenate([self._buffer, tokens]) if len(self._buffer) else tokens
        s = self.sample_len
        n = len(buf) // s
        if n == 0:
            self._buffer = buf
            return
        # Each sample start's offset in its document: distance to the last document start at or
        # before it (a start follows each end-of-text), or the carried offset if there is none.
        starts = np.arange(n + 1, dtype=np.int64) * s
        doc_starts = np.flatnonzero(buf[: n * s] == self.eot_id) + 1
        k = np.searchsorted(doc_starts, starts, side="right")
        last = np.where(k > 0, doc_starts[np.maximum(k - 1, 0)] if len(doc_starts) else 0, -self._offset)
        offsets = starts - last
        rows = buf[: n * s].reshape(n, s)
        for row, offset in zip(rows, offsets[:n].tolist()):
            self._write(row, offset)
        self._offset = int(offsets[n])
        self._buffer = buf[n * s :].copy()

    def _write(self, row: np.ndarray, offset: int) -> None:
        if self._writer is None:
            # Imported here: Streaming imports torch, which spawned tokenizer workers must not pay for.
            from streaming import MDSWriter

            self._writer = MDSWriter(
                out=str(self.out),
                columns={
                    "tokens": f"ndarray:{self.dtype}:{self.sample_len}",
                    "doc_offset": "uint32",
                    CHECKSUM_COLUMN: "uint32",
                },
                compression="zstd",
                hashes=SHARD_HASHES,
                size_limit=self.shard_size,
            )
        self._writer.write(
            {"tokens": row, "doc_offset": offset, CHECKSUM_COLUMN: sample_checksum(row, offset)}
        )
        self.samples += 1

    def finish(self, meta: dict[str, Any]) -> None:
        """Pad and write the last partial sample, close the shards, record ``meta`` in index.json."""
        if len(self._buffer):
            pad = self.sample_len - len(self._buffer)
            row = np.concatenate([self._buffer, np.full(pad, self.pad_id, dtype=self.dtype)])
            self._write(row, self._offset)
            self.padding_tokens += pad
            self._buffer = self._buffer[:0]
        if self._writer is None:
            return
        self._writer.finish()
        index_path = self.out / "index.json"
        index = json.loads(index_path.read_text())
        index[META_KEY] = meta
        index_path.write_text(json.dumps(index, sort_keys=True))

    def stats(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "samples": self.samples,
            "padding_tokens": self.padding_tokens,
        }


def validation_mask(first_index: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """Whether each document (by global index) is held out: a fixed hash, so re-runs agree."""
    if fraction <= 0:
        return np.zeros(count, dtype=bool)
    x = np.arange(first_index, first_index + count, dtype=np.uint64) + np.uint64(
        seed * 0x9E3779B97F4A7C15 % 2**64
    )
    # splitmix64 finalizer: a well-mixed 64-bit hash of the index.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _chunks(
    specs: Sequence[SourceSpec], bad: BadRecords, batch_bytes: int, per_source: list[dict[str, Any]]
) -> Iterator[Chunk]:
    """Documents of all sources, in order, grouped into chunks of about ``batch_bytes`` of text."""
    index, docs, size = 0, [], 0
    for spec in specs:
        counts = {"name": spec.name, "path": spec.path, "documents": 0, "empty_documents": 0, "chars": 0}
        per_source.append(counts)
        for doc in iter_documents(spec, bad):
            chars = len(doc) if isinstance(doc, str) else sum(len(c) + len(r) for r, c in doc.messages)
            if chars == 0:
                counts["empty_documents"] += 1
                continue
            counts["documents"] += 1
            counts["chars"] += chars
            docs.append(doc)
            size += chars
            if size >= batch_bytes:
                yield Chunk(index, docs)
                index, docs, size = index + len(docs), [], 0
    if docs:
        yield Chunk(index, docs)


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary folders that an interrupted earlier run of this conversion left behind."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        print(f"removing {stale}, left by an interrupted conversion", file=sys.stderr)
        shutil.rmtree(stale, ignore_errors=True)


def _is_remote(out: str) -> bool:
    return urllib.parse.urlparse(out).scheme != ""


def _convert_to_object_store(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert into a local temporary folder, then upload it to ``cfg.out`` (see the module doc)."""
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory(prefix="convert-") as tmp:
        local = Path(tmp) / "out"
        uploader = CloudUploader.get(out=(str(local), cfg.out), keep_local=True)
        if not cfg.overwrite and uploader.list_objects("stats.json"):
            raise FileExistsError(
                f"{cfg.out} already holds a converted stream (stats.json); pass --overwrite"
            )
        stats = convert(replace(cfg, out=str(local), overwrite=True))
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        order = {"stats.json": 2, "index.json": 1}
        for name in sorted(files, key=lambda n: order.get(Path(n).name, 0)):
            uploader.upload_file(name)
    return stats


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Run a conversion; returns what it writes to ``stats.json``, plus its wall time in ``seconds``."""
    if _is_remote(cfg.out):
        return _convert_to_object_store(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    info: TokenizerInfo = tokenizer_info(tok)
    dtype = token_dtype(info.vocab_size)
    out = Path(cfg.out)
    check_output_path(out, "--out", cfg.overwrite)
    _remove_stale_temporaries(out)
    meta = {"tokenizer": info.to_dict(), "seq_len": cfg.seq_len, "dtype": dtype}
    bad = BadRecords(skip=cfg.skip_bad)
    per_source: list[dict[str, Any]] = []
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        splits = {
            name: _SplitWriter(tmp / name, cfg.seq_len, dtype, info.eot_id, info.pad_id, cfg.shard_size)
            for name in ("train", "val")
        }
        chunks = _chunks(cfg.sources, bad, cfg.batch_bytes, per_source)
        start = time.perf_counter()
        progress = tqdm(
            desc=f"converting to {out}", unit=" tokens", unit_scale=True, disable=None, leave=False
        )
        for chunk, flat, lengths in encoded_in_order(chunks, tok, info.eot_id, dtype, cfg.workers):
            progress.update(len(flat))
            failpoints.hit("convert_chunk")
            held_out = validation_mask(chunk.first_index, len(lengths), cfg.val_fraction, cfg.split_seed)
            if not held_out.any():
                splits["train"].add(flat, len(lengths))
                continue
            token_held_out = np.repeat(held_out, lengths)
            splits["train"].add(flat[~token_held_out], int((~held_out).sum()))
            splits["val"].add(flat[token_held_out], int(held_out.sum()))
        if splits["train"].documents == 0:
            raise ValueError(f"no training document was read from {', '.join(s.path for s in cfg.sources)}")
        for writer in splits.values():
            writer.finish(meta)
        progress.close()
        stats = {
            **meta,
            "sources": per_source,
            "splits": {name: writer.stats() for name, writer in splits.items()},
            "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed,
            "skipped": {"count": len(bad.records), "records": bad.records[:_MAX_LISTED_BAD]},
        }
        atomic_write_text(tmp / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    # The wall time is returned, not written: the output stays byte-identical from run to run.
    return {**stats, "seconds": time.perf_counter() - start}


def _parse_args(argv: Sequence[str] | None) -> tuple[ConvertConfig, bool]:
    """(the conversion, whether to print every split's counts and the throughput: ``--verbose``)."""
    parser = cli.parser("python -m data.convert", __doc__)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        help="a source: PATH or key=value,... with keys path, format (auto|text|jsonl|parquet|hf|chat), "
        "name, text_field, messages_field, text_split (file|paragraph), hf_split; repeat for several",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (from data.train_tokenizer)")
    parser.add_argument(
        "--out",
        required=True,
        help="output stream folder (gets train/, val/, stats.json); local or s3://, gs://, ...",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=ConvertConfig.seq_len,
        help="tokens per training sample (stored: seq-len + 1)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=ConvertConfig.val_fraction,
        help="share of documents held out for validation (chosen by a fixed hash of the document index)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=ConvertConfig.split_seed, help="seed of the validation hash"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=ConvertConfig.workers,
        help="tokenizer processes (the output is the same)",
    )
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=ConvertConfig.batch_bytes,
        help="characters of text sent to a tokenizer process at a time",
    )
    parser.add_argument(
        "--shard-size", default=ConvertConfig.shard_size, help="MDS shard size limit before compression"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records, count and list them in stats.json (default: stop at the first, naming it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print each split's counts and the throughput on lines of their own",
    )
    args = parser.parse_args(argv)
    cfg = ConvertConfig(
        sources=[parse_source(s) for s in args.source],
        tokenizer=args.tokenizer,
        out=args.out,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        workers=args.workers,
        batch_bytes=args.batch_bytes,
        shard_size=args.shard_size,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
    )
    return cfg, args.verbose


def main(argv: Sequence[str] | None = None) -> None:
    cfg, verbose = _parse_args(argv)
    stats = convert(cfg)
    seconds = stats["seconds"]
    chars = sum(s["chars"] for s in stats["sources"])
    tokens = sum(split["tokens"] for split in stats["splits"].values())
    splits = stats["splits"]
    if verbose:
        for name, split in splits.items():
            print(
                f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {split['samples']:,} "
                f"samples of {cfg.seq_len + 1} tokens"
            )
        print(
            f"{chars / 1e6 / seconds:.2f} M chars/s, {tokens / seconds:,.0f} tokens/s with {cfg.workers} "
            f"worker(s) ({seconds:.1f} s from the first document read to the last shard written)"
        )
    if stats["skipped"]["count"]:
        print(f"skipped {stats['skipped']['count']} bad record(s); listed in {cfg.out}/stats.json")
    counts = ", ".join(
        f"{name} {split['samples']:,} samples ({split['tokens']:,} tokens)" for name, split in splits.items()
    )
    print(f"wrote {cfg.out}: {counts} of {cfg.seq_len + 1} tokens; {tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    cli.run(main)
