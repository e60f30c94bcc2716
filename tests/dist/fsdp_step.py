"""One training step of a tiny model under the Composer Trainer, run by tests/test_fsdp_dist.py.

Run as ``composer -n 2 tests/dist/fsdp_step.py OUT.pt`` (FSDP2 on CPU, gloo) or with plain
``python`` (one process, no FSDP). Every process sees the same global batch of 4 samples,
split by a DistributedSampler; with SGD at lr 1 the step changes each weight by minus its
gradient, so rank 0 saves the initial weights, the updated weights and the mean loss.
"""

from __future__ import annotations

import os
import sys

import torch
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, Dataset

from callbacks.gloo_grad_average import GlooFSDP2GradAverage
from models.composer_model import ComposerMambaLM
from models.config import preset

GLOBAL_BATCH, SEQ_LEN = 4, 24


class FixedBatches(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.tokens = torch.randint(0, 500, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)

    def __len__(self) -> int:
        return GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_TRAIN_BATCH:
            loss = state.loss.detach().clone().float()
            dist.all_reduce(loss, reduce_operation="SUM")
            self.losses.append(loss.item() / dist.get_world_size())


def main(out_path: str) -> None:
    reproducibility.seed_all(17)
    cfg = preset(os.environ.get("MODEL_PRESET", "debug"))
    model = ComposerMambaLM(cfg)
    initial = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    world = dist.get_world_size()
    dataset = FixedBatches()
    sampler = dist.get_sampler(dataset, shuffle=False)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    recorder = RecordLoss()
    # ACTIVATION_CHECKPOINTING=1 recomputes each block in backward (MambaLMHeadModel.activation_checkpointing_fn).
    recompute = os.environ.get("ACTIVATION_CHECKPOINTING") == "1"
    parallelism = {"fsdp": {"activation_checkpointing": recompute}} if world > 1 else None
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.SGD(model.parameters(), lr=1.0),
        max_duration="1ba",
        device="cpu",
        precision="fp32",
        parallelism_config=parallelism,
        callbacks=[recorder],
        algorithms=[GlooFSDP2GradAverage()],
        progress_bar=False,
        log_to_console=False,
        seed=17,
    )
    trainer.fit()
    final = get_model_state_dict(trainer.state.model.model, options=StateDictOptions(full_state_dict=True))
    if dist.get_global_rank() == 0:
        torch.save(
            {
                "initial": initial,
                "final": {k: v.clone() for k, v in final.items()},
                "losses": recorder.losses,
            },
            out_path,
        )
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1])
