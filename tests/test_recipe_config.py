"""The recipe config: registries of parts, one default per setting, and the command-line tools."""

from __future__ import annotations

import dataclasses
import inspect
import re
from enum import Enum
from pathlib import Path

import pytest
from composer.callbacks import MemoryMonitor, SpeedMonitor
from composer.core import Algorithm, Callback, Time
from composer.loggers import LoggerDestination, WandBLogger
from composer.optim import ComposerScheduler
from omegaconf import OmegaConf

from callbacks.batch_rampup import BatchRampupConfig
from callbacks.registry import REGISTRIES
from common.config import ConfigError
from common.registry import signature_schema
from recipes.config import OptimizerConfig, TrainConfig, load_train_config, resolved_dict
from recipes.train import build_trainer, prepare_run
from tests.conftest import run_cli, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
WSD_RECIPE = ROOT / "yamls" / "tiny" / "wsd.yaml"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("log_artifacts", "init_mode", "env_mode", "asks_wandb"),
    [
        (False, None, None, False),  # never uploaded: nothing to ask for
        (True, "offline", None, False),  # no server to ask
        (True, None, "offline", False),
        (True, "disabled", None, False),
        (True, None, None, True),  # uploaded online: Composer's own download
        (True, "online", "offline", True),  # init_kwargs win over the environment, as in wandb.init
    ],
)
def test_wandb_is_asked_for_a_checkpoint_only_where_it_can_hold_one(
    monkeypatch: pytest.MonkeyPatch,
    log_artifacts: bool,
    init_mode: str | None,
    env_mode: str | None,
    asks_wandb: bool,
) -> None:
    """The Trainer's autoresume asks each logger for the latest checkpoint; W&B's answer took a minute offline."""
    import wandb
    import wandb.errors

    asked: list[str] = []

    class Api:  # stands in for the W&B server: records the query, holds no artifact
        def artifact(self, name: str) -> None:
            asked.append(name)
            raise wandb.errors.CommError(f"artifact {name} not found")

    monkeypatch.setattr(wandb, "Api", Api)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    cls = REGISTRIES["loggers"].entry("wandb").builder
    assert issubclass(cls, WandBLogger)
    logger = cls(
        project="p",
        entity="e",
        log_artifacts=log_artifacts,
        rank_zero_only=False,
        init_kwargs={"mode": init_mode} if init_mode else {},
    )
    with pytest.raises(FileNotFoundError):
        logger.download_file("run/checkpoints/latest-rank0.pt", "/nonexistent/latest-rank0.pt")
    assert asked == (["e/p/run.checkpoints.latest-rank0.pt:latest"] if asks_wandb else [])


@pytest.mark.slow  # W&B and a training run: about 15 s on 2 cores
def test_yaml_adds_composer_callbacks_and_a_logger_with_arguments(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = write(
        tmp_path,
        f"base: {WSD_RECIPE}\n"
        "callbacks:\n"
        "  memory_monitor: {}\n"
        "  speed_monitor: {window_size: 3}\n"
        "loggers:\n"
        "  wandb: {project: mamba-tests, entity: lab, tags: [tiny, wsd], init_kwargs: {mode: offline}}\n",
    )
    overrides = tiny_overrides(corpus, tmp_path, max_duration="5ba", eval_interval="null")
    cfg = load_train_config([recipe], [*overrides, "scheduler.t_warmup=1ba"])
    trainer = build_trainer(prepare_run(cfg))
    callbacks = trainer.state.callbacks
    assert any(isinstance(cb, MemoryMonitor) for cb in callbacks)
    (speed,) = [cb for cb in callbacks if isinstance(cb, SpeedMonitor)]
    assert speed.history_samples.maxlen == 3 + 1  # Composer keeps window_size + 1 timestamps
    (wandb,) = [d for d in trainer.logger.destinations if isinstance(d, WandBLogger)]
    assert wandb._init_kwargs["project"] == "mamba-tests"
    assert wandb._init_kwargs["entity"] == "lab"
    assert wandb._init_kwargs["tags"] == ["tiny", "wsd"]
    trainer.fit()
    trainer.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the offline W&B run was written"


def test_an_inherited_part_is_switched_off_with_null(tmp_path: Path, corpus: dict[str, Path]) -> None:
    recipe = write(tmp_path, f"base: {WSD_RECIPE}\nalgorithms:\n  gradient_clipping: null\n")
    cfg = load_train_config([recipe], tiny_overrides(corpus, tmp_path))
    assert "gradient_clipping" not in cfg.parts("algorithms")
    assert cfg.parts("callbacks").keys() == {"speed_monitor", "lr_monitor"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.memory_monitr={}",
            r"callbacks: unknown callback 'memory_monitr' \(did you mean 'memory_monitor'\?\); "
            r"registered callbacks: loss_spike, sample_audit, speed_monitor, lr_monitor, memory_monitor",
        ),
        (
            "loggers.wandbb={}",
            r"unknown logger 'wandbb' \(did you mean 'wandb'\?\); registered loggers: wandb",
        ),
        ("scheduler.name=wds", r"unknown scheduler 'wds' \(did you mean 'wsd'\?\)"),
        (
            "callbacks.loss_spike.windw=3",
            r"unknown config key 'callbacks.loss_spike.windw' .*did you mean 'callbacks.loss_spike.window'",
        ),
        (
            "algorithms.positional_weighting.fn=cosh",
            r"bad value for config key 'algorithms.positional_weighting.fn'.*'cosh'.*\['tanh', 'linear'\]",
        ),
        ("precision=bf16", r"bad value for config key 'precision'.*'bf16'.*\['auto', 'fp32', 'amp_bf16'\]"),
        ("fsdp.version=3", r"fsdp.version.*expected one of \[1, 2\]"),
        ("data.shuffle_algo=py1x", r"data.shuffle_algo.*'py1x'.*py1e"),
    ],
)
def test_unknown_names_and_bad_choices_fail_listing_the_valid_ones(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_train_config([WSD_RECIPE], [override])


def test_rotary_wider_than_a_head_is_refused_before_the_model_is_built() -> None:
    overrides = ["model.attn_layer_idx=[1]", "model.attn.num_heads=8", "model.attn.rotary_emb_dim=32"]
    with pytest.raises(ConfigError, match=r"rotary_emb_dim=32 is larger than the head dimension 16"):
        load_train_config([WSD_RECIPE], overrides)  # d_model 128 / 8 heads = 16


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    recipe = write(tmp_path, f"base: {WSD_RECIPE}\noptimzer: {{lr: 1.0}}\nmodel: {{n_layer: 0}}\n")
    overrides = ["optimizer.lr=-1", "callbacks.loss_spike.max_retries=many", "global_train_batch_size=0"]
    with pytest.raises(ConfigError) as info:
        load_train_config([recipe], overrides)
    text = str(info.value)
    assert text.startswith("5 problems in the configuration:")
    for part in (
        "unknown config key 'optimzer'",
        "did you mean 'optimizer'",
        "optimizer.lr=-1.0 must be > 0",
        "model.n_layer=0 must be >= 1",
        "global_train_batch_size and device_train_microbatch_size must be >= 1",
        "bad value for config key 'callbacks.loss_spike.max_retries'",
    ):
        assert part in text, part


def test_a_recipe_naming_another_schedule_starts_its_section_afresh(tmp_path: Path) -> None:
    # tiny/cosine.yaml extends tiny/wsd.yaml, whose t_decay and decay_shape mean nothing to cosine.
    cfg = load_train_config([ROOT / "yamls" / "tiny" / "cosine.yaml"])
    assert cfg.scheduler == {"name": "cosine", "t_warmup": "15ba", "alpha_f": 0.1}
    cfg = load_train_config([WSD_RECIPE], ["scheduler.name=decay_phase", "scheduler.t_start=0ba"])
    assert cfg.scheduler == {"name": "decay_phase", "t_start": "0ba"}
    cfg = load_train_config([WSD_RECIPE], ["scheduler.alpha_f=0.3"])  # the same schedule: merged
    assert cfg.scheduler["t_decay"] == 0.2 and cfg.scheduler["alpha_f"] == 0.3


def test_print_config_round_trips(tmp_path: Path) -> None:
    cfg = load_train_config([ROOT / "yamls" / "tiny" / "wsd_posweight.yaml"], ["optimizer.lr=0.01"])
    printed = write(tmp_path, OmegaConf.to_yaml({**resolved_dict(cfg), "base": ""}), "printed.yaml")
    again = load_train_config([printed])
    assert resolved_dict(again) == {**resolved_dict(cfg), "base": ""}
    assert again.parts("algorithms")["positional_weighting"] == {
        "scale": 10.0,
        "per_document": True,
        "fn": "tanh",
    }


def test_the_model_vocabulary_follows_the_tokenizer(corpus: dict[str, Path]) -> None:
    cfg = load_train_config([WSD_RECIPE], [f"tokenizer={corpus['tokenizer']}"])
    assert cfg.model.vocab_size == 300  # the corpus tokenizer's, not the debug preset's 512
    cfg = load_train_config([WSD_RECIPE], [f"tokenizer={corpus['tokenizer']}", "model.vocab_size=320"])
    assert cfg.model.vocab_size == 320


# ----------------------------------------------------------------------------------------------
# One default per setting


@pytest.mark.parametrize(
    ("registry", "name"), [(key, entry.name) for key, reg in REGISTRIES.items() for entry in reg]
)
def test_a_registered_part_built_from_an_empty_section_equals_its_constructor_defaults(
    registry: str, name: str, tmp_path: Path
) -> None:
    """A recipe section that sets nothing builds the very part its constructor builds with no
    arguments: the registry adds no default of its own and changes none on the way (a tuple may
    arrive as a list). The reference is the constructor called directly, not the derived schema."""
    reg = REGISTRIES[registry]
    entry = reg.entry(name)
    params = inspect.signature(entry.builder).parameters
    required = {
        f.name: _example(f.name)
        for f in dataclasses.fields(reg.schema(name))
        if params[f.name].default is inspect.Parameter.empty
    }
    if entry.missing():  # an optional package that is not installed: a clear error before anything is built
        with pytest.raises(
            ConfigError, match=f"the .* {name!r} needs packages that are not installed: pip install"
        ):
            reg.resolve(name, required)
        return
    context = {"run_dir": str(tmp_path)}
    built = reg.build(name, required, **context)
    direct = entry.builder(**required, **{k: v for k, v in context.items() if k in entry.context})
    assert type(built) is type(direct)
    assert _settings(built) == _settings(direct), name
    # Every configurable argument is passed, so none falls back on a second default somewhere.
    assert set(reg.resolve(name, required)) == {f.name for f in dataclasses.fields(reg.schema(name))}
    expected = {
        "scheduler": ComposerScheduler,
        "algorithms": Algorithm,
        "callbacks": Callback,
        "loggers": LoggerDestination,
    }
    assert isinstance(built, expected[registry]) if registry != "scheduler" else callable(built)


def _settings(part: object) -> dict[str, object]:
    """A part's plain attributes (what its constructor stored), tuples as lists."""

    def plain(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (int, float, str, bool, Path, Enum, Time)):
            return value
        return type(value)  # an object (a lock, a handle): only its kind can be compared

    return {k: plain(v) for k, v in vars(part).items()}


def _example(field_name: str) -> object:
    """A valid value for a required argument of a registered part (their types are plain)."""
    examples = {
        "t_warmup": "10ba",
        "clipping_type": "norm",
        "clipping_threshold": 1.0,
        "monitor": "loss",
        "dataloader_label": "eval",
        "threshold": 1.0,
    }
    return examples[field_name]


@pytest.mark.parametrize(
    ("section", "builder"),
    [
        (OptimizerConfig, OptimizerConfig.build),
        (BatchRampupConfig, BatchRampupConfig.schedule),
        (TrainConfig, build_trainer),
    ],
)
def test_builders_take_no_default_of_their_own(section: type, builder: object) -> None:
    """What builds a section's component takes its settings from the section, never a default of its own."""
    fields = {f.name for f in dataclasses.fields(section)}
    defaulted = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.name in fields and p.default is not inspect.Parameter.empty
    ]
    assert defaulted == []


def test_signature_schema_types_plain_values() -> None:
    def part(
        a: int, b: str | None = None, c: float | int = 1.5, d: list[str] | None = None, e: object = print
    ) -> None:
        """A part."""

    schema = signature_schema(part, "part")
    assert [f.name for f in dataclasses.fields(schema)] == ["a", "b", "c", "d"]  # e's default is an object
    with pytest.raises(Exception, match="a"):
        OmegaConf.merge(OmegaConf.structured(schema), {"a": "x"})


# ----------------------------------------------------------------------------------------------
# Command-line tools


ENTRY_POINTS = {
    "recipes/train.py": ["--print-config", "--debug"],
    "recipes.evaluate": ["--max-batches"],
    "recipes.export": ["--to", "--out", "--tokenizer", "--overwrite"],
    "recipes.inheritune": ["--reference", "--start-depth", "--grow-by", "--max-depth", "--lr-rewarmup"],
    "eval.report": ["--out", "--smoothing", "--zoom", "--sync-readme"],
    "eval.needle": ["--checkpoint", "--tokenizer", "--lengths", "--depths", "--trials", "--out"],
    "eval.harness": ["--checkpoint", "--tasks", "--num-fewshot", "--limit", "--out"],
    "eval.ablation": ["--variants", "--seeds", "--out"],
    "data.passkey": ["--out", "--count", "--haystack", "--seed"],
    "recipes.doctor": ["--debug"],
    "data.convert": ["--source", "--tokenizer", "--seq-len", "--val-fraction", "--workers", "--skip-bad"],
    "data.train_tokenizer": ["--source", "--vocab-size", "--min-frequency", "--max-bytes"],
    "data.demo_corpus": ["--out", "--code-mb", "--chats"],
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_help_names_every_option(entry: str) -> None:
    proc = run_cli(entry, "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ENTRY_POINTS[entry]:
        assert option in proc.stdout, option


USER_MISTAKES = [
    ("recipes/train.py", [str(WSD_RECIPE), "optimzer.lr=1"], "did you mean 'optimizer'"),
    ("recipes/train.py", ["missing.yaml"], "recipe file not found: missing.yaml"),
    ("data.convert", ["--source", "nope.jsonl", "--tokenizer", "nope", "--out", "x"], "no tokenizer at nope"),
    ("data.train_tokenizer", ["--source", "path=x.txt,weight=-1", "--out", "x"], "weight=-1.0"),
    ("recipes.evaluate", ["no-such-run"], "no-such-run"),
]


@pytest.mark.parametrize(("entry", "args", "message"), USER_MISTAKES)
def test_a_user_mistake_is_one_message_and_exit_2(
    entry: str, args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    proc = run_cli(entry, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr  # the message, and where --debug is
    with pytest.raises(Exception, match=re.escape(message)):  # --debug: the traceback instead
        run_cli(entry, *args, "--debug")
    assert not any(tmp_path.iterdir()), "a refused command wrote nothing"
