"""Loader: batches for Composer, exact resume, tokenizer check, corrupt shards, stale shared memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from data.loader import DataConfig, ShardError, build_dataloader, build_dataset, make_example
from data.shared_memory import clean_stale_shared_memory, machine_turn, stale_blocks
from data.sources import SourceSpec
from tests.data_helpers import convert_sources, make_docs, make_tokenizer, write_jsonl, write_mixture


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tokenizer and one converted stream of about 120 samples of 33 tokens."""
    root = tmp_path_factory.mktemp("corpus")
    tok = make_tokenizer(root / "tok")
    path = write_jsonl(root / "d.jsonl", [{"text": d} for d in make_docs(300, seed=29)])
    convert_sources(root / "mds", tok, [SourceSpec(path=str(path))], seq_len=32, val_fraction=0.1)
    return tok, root / "mds"


@pytest.fixture(autouse=True)
def _clean_shm() -> None:
    clean_stale_shared_memory()


def data_config(tmp: Path, stream: Path, cache: str, **kwargs: object) -> DataConfig:
    mixture = write_mixture(
        tmp / f"{cache}.yaml", {"stable": {"s": {"remote": str(stream), "local": str(tmp / cache)}}}
    )
    return DataConfig(mixture=str(mixture), **kwargs)  # type: ignore[arg-type]


def test_make_example_hand_built() -> None:
    eot, pad = 0, 1
    tokens = np.array([7, 8, 0, 9, 5, 0, 6, 1, 1], dtype=np.uint16)
    ex = make_example(tokens, doc_offset=4, eot_id=eot, pad_id=pad)
    assert ex["input_ids"].tolist() == [7, 8, 0, 9, 5, 0, 6, 1]
    assert ex["labels"].tolist() == [8, 0, 9, 5, 0, 6, -100, -100]
    assert ex["position_ids"].tolist() == [4, 5, 6, 0, 1, 2, 0, 1]
    assert all(v.dtype == torch.int64 for v in ex.values())


def test_batches_are_int64_dicts(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    spec = build_dataloader(data_config(tmp_path, stream, "c"), tok, device_batch_size=4)
    batch = next(iter(spec.dataloader))
    assert set(batch) == {"input_ids", "labels", "position_ids", "sample_id"}
    assert all(
        batch[k].shape == (4, 32) and batch[k].dtype == torch.int64
        for k in ("input_ids", "labels", "position_ids")
    )
    ids = batch.pop("sample_id")
    assert ids.dtype == torch.int64 and len(set(ids.tolist())) == 4
    dataset = spec.dataloader.dataset
    for i, sample_id in enumerate(ids.tolist()):  # each row is the sample its id names
        assert torch.equal(dataset[sample_id]["input_ids"], batch["input_ids"][i])
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert spec.get_num_tokens_in_batch(batch) == 4 * 32
    assert spec.dataloader.dataset.seq_len == 32


def take(loader: torch.utils.data.DataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_resume_matches_uninterrupted_run(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    batch_size, k = 4, 3
    full = take(build_dataloader(data_config(tmp_path, stream, "a"), tok, batch_size).dataloader, k + 2)
    first = build_dataloader(data_config(tmp_path, stream, "b"), tok, batch_size)
    seen = take(first.dataloader, k)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(seen, full))
    state = first.dataloader.dataset.state_dict(
        num_samples=k * batch_size, from_beginning=True
    )  # as Composer
    resumed = build_dataloader(data_config(tmp_path, stream, "c"), tok, batch_size)
    resumed.dataloader.dataset.load_state_dict(state)
    after = take(resumed.dataloader, 2)
    for got, want in zip(after, full[k:]):
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_new_phase_starts_its_mix_from_the_beginning(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus

    def phase_loader(phase: str, cache: str) -> torch.utils.data.DataLoader:
        mixture = write_mixture(tmp_path / f"{cache}.yaml", {
            "stable": {"s": {"remote": str(stream), "local": str(tmp_path / cache), "proportion": 1.0}},
            "decay": {"s": {"remote": str(stream), "local": str(tmp_path / cache), "repeat": 0.5}},
        })  # fmt: skip
        return build_dataloader(DataConfig(mixture=str(mixture), phase=phase), tok, 4).dataloader

    stable = phase_loader("stable", "a")
    take(stable, 3)
    state = stable.dataset.state_dict(num_samples=12, from_beginning=True)
    fresh = take(phase_loader("decay", "b"), 1)[0]
    decay = phase_loader("decay", "c")
    with pytest.warns(UserWarning, match="belongs to another mix"):
        decay.dataset.load_state_dict(state)
    assert torch.equal(take(decay, 1)[0]["input_ids"], fresh["input_ids"])


def test_tokenizer_mismatch_is_refused(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    _, stream = corpus
    other = make_tokenizer(tmp_path / "other", vocab_size=380)
    with pytest.raises(ValueError, match=r"tokenizer mismatch: stream 's' .*vocab 400.*vocab 380"):
        build_dataset(data_config(tmp_path, stream, "c"), other, 4)


def test_missing_stream_names_convert_command(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, _ = corpus
    mixture = write_mixture(tmp_path / "m.yaml", {"stable": {"en": {"local": str(tmp_path / "nothing")}}})
    with pytest.raises(ConfigError, match=r"stream 'en': no .*nothing/train/index.json; convert"):
        build_dataset(DataConfig(mixture=str(mixture)), tok, 4)


def test_corrupted_shard_is_named(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    broken = tmp_path / "broken"
    convert_sources(broken, tok, [SourceSpec(path=str(stream.parent / "d.jsonl"))], seq_len=32)
    shard = broken / "train" / "shard.00000.mds.zstd"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    dataset = build_dataset(data_config(tmp_path, broken, "c", shuffle=False), tok, 4)
    with pytest.raises(
        ShardError, match=r"shard .*train/shard\.00000\.mds\.zstd is corrupt.*Checksum failure"
    ):
        list(dataset)


def test_a_flipped_bit_in_an_unpacked_shard_is_named(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    """Streaming checks a shard's hash only when it unpacks it; the per-sample CRC catches later damage."""
    tok, stream = corpus
    data = tmp_path / "data"
    convert_sources(data, tok, [SourceSpec(path=str(stream.parent / "d.jsonl"))], seq_len=32)
    cfg = data_config(tmp_path, data, "c", shuffle=False)
    assert len(list(build_dataset(cfg, tok, 4))) > 0  # unpacks shard.00000.mds into the local cache c/
    raw = tmp_path / "c" / "train" / "shard.00000.mds"
    blob = bytearray(raw.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # the low bit of a token: still a valid id, a different text
    raw.write_bytes(bytes(blob))
    with pytest.raises(
        ShardError, match=r"shard .*c/train/shard\.00000\.mds, sample \d+ .* checksum does not match"
    ):
        list(build_dataset(cfg, tok, 4))


def test_a_token_outside_the_vocabulary_is_named(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    dataset = build_dataset(data_config(tmp_path, stream, "c", shuffle=False), tok, 4)
    dataset.vocab_size = 5  # every stored id >= 5 now reads as corrupt
    with pytest.raises(ShardError, match=r"sample 0 .* holds token id \d+, outside the tokenizer's 5 ids"):
        next(iter(dataset))


@pytest.mark.serial  # another worker building a dataset would clean the dead run's blocks first
def test_stale_shared_memory_from_a_crash_is_cleaned(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    cfg = data_config(tmp_path, stream, "c")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from data.loader import DataConfig, build_dataset
        dataset = build_dataset(DataConfig(mixture={cfg.mixture!r}), {str(tok)!r}, 4)
        assert len(next(iter(dataset))["input_ids"]) == 32
        if sys.argv[1] == "crash":
            # Die with Python's resource tracker (same process group), as when a job is killed:
            # nothing releases Streaming's shared memory.
            os.killpg(0, signal.SIGKILL)
    """)
    before = set(os.listdir("/dev/shm"))
    crashed = subprocess.run(
        [sys.executable, "-c", script, "crash"],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert crashed.returncode == -9, crashed.stderr
    # New blocks that no live process maps: the dead run's (other jobs on the machine may add their own).
    stale = {name for names in stale_blocks().values() for name in names}
    leftovers = (set(os.listdir("/dev/shm")) - before) & stale
    assert any(name.endswith("_locals") for name in leftovers)
    # The same local folder, still claimed in shared memory by the dead run.
    rerun = subprocess.run(
        [sys.executable, "-c", script, "rerun"], capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not leftovers & set(os.listdir("/dev/shm"))


# Another job on the machine, inside its turn: it scans for the first free prefix as Streaming
# does, pauses 3 s (a slow machine, widened), then creates that prefix's block.
OTHER_JOB = textwrap.dedent("""
    import sys, time
    from multiprocessing.shared_memory import SharedMemory
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _check_and_find, _get_path
    from data.shared_memory import machine_turn
    with machine_turn():
        prefix = max(_check_and_find(["/other-job"], [None], name) for name in SHM_TO_CLEAN)
        print("scanned", prefix, flush=True)
        time.sleep(float(sys.argv[1]))
        block = SharedMemory(_get_path(prefix, LOCALS), create=True, size=64)
        print("created", flush=True)
    sys.stdin.read()  # until the test has looked
    block.close()
    block.unlink()
""")


def test_jobs_on_one_machine_take_turns_choosing_a_prefix(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    """A dataset built while another job is between its prefix scan and its creation waits for it
    and takes the next prefix; without turns both pick the same one and one of them fails."""
    tok, stream = corpus
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_JOB, "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        scanned = other.stdout.readline().split()
        assert scanned[0] == "scanned", other.stderr.read() if other.stderr else ""
        dataset = build_dataset(data_config(tmp_path, stream, "c"), tok, 4)
        assert other.stdout.readline().strip() == "created", other.stderr.read() if other.stderr else ""
        assert dataset._shm_prefix_int != int(scanned[1])
        assert len(next(iter(dataset))["input_ids"]) == 32
        other.stdin.close()
        assert other.wait(timeout=60) == 0
    finally:
        other.kill()


def test_a_turn_held_too_long_is_not_waited_for_forever() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", OTHER_JOB, "600"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("scanned")
        with (
            pytest.warns(
                UserWarning, match=r"another job has held .*streaming_prefix_turn.lock for over 0 s"
            ),
            machine_turn(wait_s=0.2),
            machine_turn(wait_s=0.2),
        ):  # nested: nothing more to take
            pass
    finally:
        holder.kill()
        holder.wait()


def test_cleanup_keeps_live_datasets(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    dataset = build_dataset(data_config(tmp_path, stream, "c"), tok, 4)
    live = set(os.listdir("/dev/shm"))
    assert not set(clean_stale_shared_memory()) & live
    assert live <= set(os.listdir("/dev/shm"))
    assert len(next(iter(dataset))["input_ids"]) == 32


def test_an_abandoned_pass_stops_its_background_threads(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    """A pass left after a few samples (training ending mid-epoch, a short evaluation) stops
    Streaming's download and index threads; left running, they poll for the rest of the process."""
    tok, stream = corpus
    dataset = build_dataset(data_config(tmp_path, stream, "c"), tok, 4)
    samples = iter(dataset)
    next(samples)
    iteration = dataset._iterator
    samples.close()
    deadline = time.monotonic() + 30
    while iteration._num_exited < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert iteration._num_exited == 2  # both threads returned
    # The dataset still serves a new pass, from its start.
    assert int(next(iter(dataset))["sample_id"]) >= 0


def test_eval_split_reads_each_held_out_sample_once(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    dataset = build_dataset(data_config(tmp_path, stream, "c", epoch_size=10_000), tok, 4, split="val")
    import json

    samples = json.loads((stream / "stats.json").read_text())["splits"]["val"]["samples"]
    assert len(list(dataset)) == samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_resume_under_two_processes(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    tok, stream = corpus
    helper = Path(__file__).with_name("data_helpers.py")
    composer = Path(sys.executable).with_name("composer")
    port = str(free_port())
    cmd = [str(composer), "-n", "2", "--master_port", port, str(helper), str(stream), str(tok), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for saved in ranks:
        for got, want in zip(saved["resumed"], saved["full"][3:]):
            for key in want:
                assert torch.equal(got[key], want[key]), key
    # The two ranks read different samples.
    assert not torch.equal(ranks[0]["full"][0]["input_ids"], ranks[1]["full"][0]["input_ids"])
