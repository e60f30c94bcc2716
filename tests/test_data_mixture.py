"""Mixtures: YAML checks, shipped mixtures, proportions within 2%, one epoch of chat in decay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from data.loader import DataConfig, build_dataset
from data.mixture import load_mixture, phase_streams
from data.shared_memory import clean_stale_shared_memory
from data.sources import SourceSpec
from data.tokenizer import load_tokenizer
from tests.data_helpers import convert_sources, make_chats, make_tokenizer, write_jsonl, write_mixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Three small streams whose text tells them apart: x-words, q-words and chats."""
    root = tmp_path_factory.mktemp("mix")
    tok = make_tokenizer(root / "tok")
    xs = write_jsonl(
        root / "x.jsonl", [{"text": " ".join(["xx", "xy", "yx"] * (3 + i % 7))} for i in range(150)]
    )
    qs = write_jsonl(
        root / "q.jsonl", [{"text": " ".join(["qq", "qk", "kq"] * (3 + i % 5))} for i in range(120)]
    )
    chat = write_jsonl(root / "c.jsonl", [{"messages": c} for c in make_chats(40, seed=31)])
    out = {}
    for name, spec in {"x": SourceSpec(path=str(xs)), "q": SourceSpec(path=str(qs)),
                       "chat": SourceSpec(path=str(chat), format="chat")}.items():  # fmt: skip
        out[name] = root / name
        convert_sources(out[name], tok, [spec], seq_len=32)
    return tok, out


@pytest.fixture(autouse=True)
def _clean_shm() -> None:
    clean_stale_shared_memory()


def test_stable_proportions_within_two_percent(tmp_path: Path, streams: tuple[Path, dict[str, Path]]) -> None:
    tok_dir, dirs = streams
    mixture = write_mixture(tmp_path / "m.yaml", {"stable": {
        "x": {"remote": str(dirs["x"]), "local": str(tmp_path / "cx"), "proportion": 0.7},
        "q": {"remote": str(dirs["q"]), "local": str(tmp_path / "cq"), "proportion": 0.3},
    }})  # fmt: skip
    # Streaming draws each stream's share of an epoch as a count (proportion x epoch size), not
    # sample by sample, so one epoch of 2,000 shows the split as well as a larger one.
    epoch = 2_000
    dataset = build_dataset(DataConfig(mixture=str(mixture), epoch_size=epoch), tok_dir, 8)
    tok = load_tokenizer(tok_dir)
    counts = {"x": 0, "q": 0}
    for n, example in enumerate(dataset):
        text = tok.decode(example["input_ids"].tolist())
        counts["x" if "x" in text else "q"] += 1
        assert ("x" in text) != ("q" in text)
        if n + 1 == epoch:
            break
    assert sum(counts.values()) == epoch
    assert counts["x"] / epoch == pytest.approx(0.7, abs=0.02)


def test_decay_serves_one_epoch_of_chat(tmp_path: Path, streams: tuple[Path, dict[str, Path]]) -> None:
    tok_dir, dirs = streams
    mixture = write_mixture(tmp_path / "m.yaml", {"decay": {
        "x": {"remote": str(dirs["x"]), "local": str(tmp_path / "cx"), "repeat": 0.5},
        "q": {"remote": str(dirs["q"]), "local": str(tmp_path / "cq"), "repeat": 0.5},
        "chat": {"remote": str(dirs["chat"]), "local": str(tmp_path / "cc"), "repeat": 1.0},
    }})  # fmt: skip
    dataset = build_dataset(DataConfig(mixture=str(mixture), phase="decay"), tok_dir, 4)
    samples = {
        name: json.loads((d / "stats.json").read_text())["splits"]["train"]["samples"]
        for name, d in dirs.items()
    }
    tok = load_tokenizer(tok_dir)
    chat_samples = []
    total = 0
    for example in dataset:
        total += 1
        ids = example["input_ids"].tolist()
        if not set(tok.decode(ids)) <= set("xyqk "):  # chat text has other letters
            chat_samples.append(tuple(ids))
    assert len(chat_samples) == samples["chat"]
    assert len(set(chat_samples)) == samples["chat"]  # every chat sample exactly once
    assert total == samples["chat"] + samples["x"] // 2 + samples["q"] // 2


def test_shipped_mixtures_load() -> None:
    paths = sorted((REPO / "yamls" / "data").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        mixture = load_mixture(path, ["root=/data"])
        # One-phase mixes on purpose: a decay from someone else's pre-decay checkpoint (Falcon-Mamba's)
        # and the positional-weighting ablation's long documents (its runs never change mix).
        phases = {"falcon_mamba_decay.yaml": {"decay"}, "long_docs.yaml": {"stable"}}
        assert set(mixture.phases) == phases.get(path.name, {"stable", "decay"}), path
        for phase in mixture.phases:
            assert all(s.local.startswith("/data/") for s in phase_streams(mixture, phase).values()), path
        if "decay" not in mixture.phases:
            continue
        stable = phase_streams(mixture, "stable") if "stable" in mixture.phases else {}
        assert all(s.proportion is not None for s in stable.values())
        decay = phase_streams(mixture, "decay")
        if path.name in ("demo.yaml", "mambaoutai.yaml"):  # the decay mix adds one epoch of chat data
            chat = [s for s in decay.values() if s.repeat == 1.0]
            assert len(chat) == 1 and set(stable) < set(decay)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_mixture_errors_name_the_key(tmp_path: Path) -> None:
    mixed = "phases:\n  decay:\n    streams:\n      a: {local: x, proportion: 0.5}\n      b: {local: y, repeat: 1.0}\n"
    with pytest.raises(
        ValueError, match=r"phases\.decay\.streams: streams \['a'\] have a proportion but \['b'\] do not"
    ):
        load_mixture(write_yaml(tmp_path, mixed))
    both = "phases:\n  s:\n    streams:\n      a: {local: x, repeat: 0.5, choose: 3}\n"
    with pytest.raises(ValueError, match=r"phases\.s\.streams\.a sets repeat and choose: keep only one"):
        load_mixture(write_yaml(tmp_path, both))
    typo = "phases:\n  s:\n    streams:\n      a: {local: x, proportoin: 0.5}\n"
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'phases\.s\.streams\.a\.proportoin'.*did you mean 'proportion'",
    ):
        load_mixture(write_yaml(tmp_path, typo))
    no_local = "phases:\n  s:\n    streams:\n      a: {proportion: 1.0}\n"
    with pytest.raises(ValueError, match=r"phases\.s\.streams\.a\.local is empty"):
        load_mixture(write_yaml(tmp_path, no_local))
    ok = load_mixture(write_yaml(tmp_path, "phases:\n  stable:\n    streams:\n      a: {local: x}\n"))
    with pytest.raises(ConfigError, match=r"phase 'decay' is not in the mixture.*phases: stable"):
        phase_streams(ok, "decay")


def test_data_config_checks() -> None:
    with pytest.raises(ValueError, match=r"data\.mixture is empty"):
        DataConfig(mixture="")
    with pytest.raises(ConfigError, match=r"config key 'mixture' has no value"):
        load_config(DataConfig)
    with pytest.raises(
        ConfigError, match=r"sampling_method.*'random'.*expected one of \['balanced', 'fixed'\]"
    ):
        load_config(DataConfig, overrides=["mixture=m.yaml", "sampling_method=random"])
    with pytest.raises(ConfigError, match=r"2 problems.*\n.*epoch_size=0.*\n.*num_workers=-1"):
        load_config(DataConfig, overrides=["mixture=m.yaml", "epoch_size=0", "num_workers=-1"])
