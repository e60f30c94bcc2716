"""Composer resumes the loader from a checkpoint: the batches after resume are the uninterrupted run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.models import ComposerModel

from data.loader import DataConfig, build_dataloader
from data.shared_memory import clean_stale_shared_memory
from data.sources import SourceSpec
from tests.data_helpers import convert_sources, make_docs, make_tokenizer, write_jsonl, write_mixture


class BatchRecorder(ComposerModel):
    """A one-parameter model that remembers the batches it was trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.training:
            self.seen.append(batch["input_ids"].clone())
        return self.scale * batch["input_ids"].float().mean()

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs


@pytest.fixture(autouse=True)
def _clean_shm() -> None:
    clean_stale_shared_memory()


def test_composer_checkpoint_resumes_the_data_position(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(200, seed=41)])
    convert_sources(tmp_path / "mds", tok, [SourceSpec(path=str(path))], seq_len=32)

    def run(cache: str, max_duration: str, load_path: str | None = None) -> BatchRecorder:
        mixture = write_mixture(tmp_path / f"{cache}.yaml", {
            "stable": {"s": {"remote": str(tmp_path / "mds"), "local": str(tmp_path / cache)}}
        })  # fmt: skip
        model = BatchRecorder()
        trainer = Trainer(
            model=model,
            train_dataloader=build_dataloader(DataConfig(mixture=str(mixture)), tok, device_batch_size=4),
            max_duration=max_duration,
            optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
            device="cpu",
            save_folder=str(tmp_path / f"ckpt_{cache}"),
            save_filename="ba{batch}-rank{rank}.pt",
            save_interval="3ba",
            load_path=load_path,
            progress_bar=False,
            log_to_console=False,
        )
        trainer.fit()
        trainer.close()
        return model

    full = run("full", "5ba")
    run("first", "3ba")
    resumed = run("resumed", "5ba", load_path=str(tmp_path / "ckpt_first" / "ba3-rank0.pt"))
    assert len(full.seen) == 5 and len(resumed.seen) == 2
    for got, want in zip(resumed.seen, full.seen[3:]):
        assert torch.equal(got, want)
