"""The lr schedules against their closed forms, in a bare State and in a real Composer Trainer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from composer import Callback, Trainer
from composer.core import State, Time, Timestamp
from composer.devices import DeviceCPU
from composer.models import ComposerModel
from composer.optim import CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler

from callbacks.registry import schedulers
from callbacks.schedulers import CosineWithWarmupScheduler, DecayPhaseScheduler, WarmupStableDecayScheduler
from common.config import ConfigError


def make_state(max_duration: str, dataloader: list | None = None) -> State:
    return State(
        model=torch.nn.Linear(1, 1),
        rank_zero_seed=0,
        run_name="test",
        device=DeviceCPU(),
        max_duration=max_duration,
        dataloader=dataloader,
        dataloader_label=None if dataloader is None else "train",
    )


def at(state: State, **timestamp: int) -> State:
    state.timestamp = Timestamp(**timestamp)
    return state


def reference(t: float, warm: float, start: float, end: float, shape: str, alpha_f: float) -> float:
    """The schedule written out once more, independently of the module."""
    if t < warm:
        return t / warm
    if t <= start:
        return 1.0
    x = min(1.0, (t - start) / (end - start))
    return {
        "linear": 1.0 - (1.0 - alpha_f) * x,
        "cosine": alpha_f + (1.0 - alpha_f) * (1.0 + math.cos(math.pi * x)) / 2.0,
        "1-sqrt": alpha_f + (1.0 - alpha_f) * (1.0 - math.sqrt(x)),
        "exponential": math.exp(x * math.log(alpha_f)) if alpha_f > 0 else float("nan"),
    }[shape]


# Hand-computed values at a quarter of the decay (x = 0.25) with alpha_f = 0.1:
# linear 1 - 0.9/4; cosine 0.1 + 0.45 (1 + cos(pi/4)); 1-sqrt 0.1 + 0.9 (1 - 0.5); exp 0.1**0.25.
QUARTER = {"linear": 0.775, "cosine": 0.868198052, "1-sqrt": 0.55, "exponential": 0.562341325}


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential"])
def test_wsd_in_batches_matches_closed_form(shape: str) -> None:
    state = make_state("1000ba")
    sched = WarmupStableDecayScheduler("100ba", 0.3, shape, alpha_f=0.1)
    assert sched.stable_end(state) == Time(700, "ba")
    expected = {0: 0.0, 50: 0.5, 100: 1.0, 400: 1.0, 700: 1.0, 775: QUARTER[shape], 1000: 0.1, 1200: 0.1}
    for batch, value in expected.items():
        assert sched(at(state, batch=batch)) == pytest.approx(value, abs=1e-9), batch
    for batch in range(0, 1001, 7):
        assert sched(at(state, batch=batch)) == pytest.approx(
            reference(batch, 100, 700, 1000, shape, 0.1), abs=1e-12
        )


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential"])
def test_wsd_in_tokens_matches_closed_form(shape: str) -> None:
    state = make_state("1e6tok")
    sched = WarmupStableDecayScheduler("1e5tok", "2e5tok", shape, alpha_f=0.1)
    assert sched.stable_end(state) == Time(800_000, "tok")
    assert sched(at(state, token=50_000, batch=3)) == pytest.approx(0.5)
    assert sched(at(state, token=800_000, batch=3)) == 1.0
    assert sched(at(state, token=850_000, batch=3)) == pytest.approx(QUARTER[shape], abs=1e-9)
    assert sched(at(state, token=1_000_000, batch=3)) == pytest.approx(0.1)
    for token in range(0, 1_000_001, 12_345):
        assert sched(at(state, token=token)) == pytest.approx(
            reference(token, 1e5, 8e5, 1e6, shape, 0.1), abs=1e-12
        )


def test_wsd_warmup_in_batches_decay_in_tokens() -> None:
    """Mambaoutai's form: a warmup in steps, the decay a share of a token budget."""
    state = make_state("1000tok")
    sched = WarmupStableDecayScheduler("10ba", 0.1, "linear", alpha_f=0.0)
    assert sched(at(state, batch=5, token=50)) == pytest.approx(0.5)
    assert sched(at(state, batch=10, token=100)) == 1.0
    assert sched(at(state, batch=95, token=950)) == pytest.approx(0.5)
    # A warmup still running when the decay should start is a configuration error.
    with pytest.raises(ValueError, match="warmup"):
        sched(at(state, batch=5, token=950))


def test_wsd_samples_epochs_and_duration_fractions() -> None:
    state = make_state("2ep", dataloader=list(range(50)))  # 50 batches per epoch -> t_max = 100ba
    sched = WarmupStableDecayScheduler("0.1dur", "1ep", "linear", alpha_f=0.0)
    assert sched.stable_end(state) == Time(50, "ba")
    assert sched(at(state, batch=5)) == pytest.approx(0.5)
    assert sched(at(state, batch=75)) == pytest.approx(0.5)
    samples = make_state("4000sp")
    sched = WarmupStableDecayScheduler("400sp", "1000sp", "linear", alpha_f=0.0)
    assert sched(at(samples, sample=200)) == pytest.approx(0.5)
    assert sched(at(samples, sample=3500)) == pytest.approx(0.5)


def test_scale_schedule_ratio_stretches_the_schedule() -> None:
    """Composer's contract f_ssr(t) = f(t / ssr), with max_duration already scaled by the Trainer."""
    base, scaled = make_state("1000ba"), make_state("2000ba")
    for scale_warmup in (True, False):
        sched = WarmupStableDecayScheduler("100ba", "300ba", "cosine", alpha_f=0.1, scale_warmup=scale_warmup)
        for batch in range(0, 2001, 20):
            got = sched(at(scaled, batch=batch), ssr=2.0)
            if scale_warmup or batch >= 200:
                assert got == pytest.approx(sched(at(base, batch=batch // 2)), abs=1e-12), batch
            else:  # the warmup keeps its unscaled length of 100 batches
                assert got == pytest.approx(min(1.0, batch / 100)), batch


def test_cosine_equals_composer_cosine_with_warmup() -> None:
    state = make_state("1000ba")
    ours = CosineWithWarmupScheduler("48ba", alpha_f=0.1)
    composers = CosineAnnealingWithWarmupScheduler(t_warmup="48ba", alpha_f=0.1)
    for batch in range(0, 1001):
        at(state, batch=batch)
        assert ours(state) == pytest.approx(composers(state), abs=1e-12)
    assert ours(at(state, batch=524)) == pytest.approx(0.55)  # halfway through the cosine: (0.1 + 1) / 2


def test_d2z_decays_linearly_to_zero_after_warmup() -> None:
    """D2Z is Composer's linear schedule with alpha_f 0: equal to our WSD with a whole-run decay."""
    state = make_state("1000ba")
    d2z = schedulers.build("linear_with_warmup", {"t_warmup": "200ba", "alpha_f": 0.0})
    assert isinstance(d2z, LinearWithWarmupScheduler)
    assert d2z(at(state, batch=100)) == pytest.approx(0.5)
    assert d2z(at(state, batch=200)) == 1.0
    assert d2z(at(state, batch=600)) == pytest.approx(0.5)
    assert d2z(at(state, batch=1000)) == 0.0
    # Equal to WSD with t_decay the whole post-warmup time.
    wsd = WarmupStableDecayScheduler("200ba", "800ba", "linear", alpha_f=0.0)
    for batch in range(0, 1001, 13):
        assert d2z(at(state, batch=batch)) == pytest.approx(wsd(state), abs=1e-12)


def test_decay_phase_continues_from_the_pre_decay_checkpoint() -> None:
    full = make_state("1000ba")
    wsd = WarmupStableDecayScheduler("100ba", 0.2, "1-sqrt", alpha_f=0.05)
    t_start = wsd.stable_end(full)
    assert t_start == Time(800, "ba")
    # Resuming the full state at 800ba with the same max_duration: the first value is the stable lr.
    resumed = DecayPhaseScheduler(t_start=t_start, decay_shape="1-sqrt", alpha_f=0.05)
    assert resumed(at(full, batch=800)) == 1.0
    assert wsd(at(full, batch=799)) == 1.0
    for batch in range(800, 1001, 5):
        assert resumed(at(full, batch=batch)) == pytest.approx(wsd(at(full, batch=batch)), abs=1e-12)
    # Weights only (the timestamp restarts at 0), a 200-batch decay run.
    fresh = make_state("200ba")
    restarted = schedulers.build("decay_phase", {"decay_shape": "1-sqrt", "alpha_f": 0.05})
    assert restarted(at(fresh, batch=0)) == 1.0
    assert restarted(at(fresh, batch=50)) == pytest.approx(0.05 + 0.95 * (1 - 0.5))
    assert restarted(at(fresh, batch=200)) == pytest.approx(0.05)


class _TwoParams(ComposerModel):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.5]))

    def forward(self, batch: dict) -> torch.Tensor:
        return (batch["x"] * self.w).sum(dim=-1)

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return ((outputs - batch["y"]) ** 2).mean()


class _RecordLr(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def batch_start(self, state: State, logger: object) -> None:
        self.lrs.append(state.optimizers[0].param_groups[0]["lr"])


def _fit(max_duration: str, scheduler: object, n_batches: int = 20) -> list[float]:
    torch.manual_seed(0)
    data = [
        {"x": torch.randn(2), "y": torch.randn(()), "input_ids": torch.zeros(8, dtype=torch.long)}
        for _ in range(2 * n_batches)
    ]
    model, record = _TwoParams(), _RecordLr()
    trainer = Trainer(
        model=model,
        train_dataloader=torch.utils.data.DataLoader(data, batch_size=2),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=2e-3),
        schedulers=scheduler,
        callbacks=[record],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    return record.lrs


def test_trainer_lr_follows_wsd_each_batch() -> None:
    """A real Trainer: Composer steps the scheduler before advancing the timestamp, so batch n
    trains with f(n - 1) (batch 0 with f(0))."""
    lrs = _fit("20ba", schedulers.build("wsd", {"t_warmup": "4ba", "t_decay": 0.5, "alpha_f": 0.1}))
    assert len(lrs) == 20
    for n, lr in enumerate(lrs):
        assert lr == pytest.approx(2e-3 * reference(max(n - 1, 0), 4, 10, 20, "linear", 0.1), abs=1e-15), n


def test_trainer_lr_follows_wsd_in_tokens() -> None:
    """16 tokens per batch (2 x 8 input_ids): 320 tokens = 20 batches; timestamps in tokens."""
    sched = WarmupStableDecayScheduler("64tok", "160tok", "cosine", alpha_f=0.0)
    lrs = _fit("320tok", sched)
    assert len(lrs) == 20
    for n, lr in enumerate(lrs):
        tokens = 16 * max(n - 1, 0)
        assert lr == pytest.approx(2e-3 * reference(tokens, 64, 160, 320, "cosine", 0.0), abs=1e-15), n


def test_config_errors_name_the_key_and_the_fix() -> None:
    state = make_state("1000ba")
    with pytest.raises(ValueError, match=r"t_warmup \(300ba\) \+ t_decay \(800ba\) exceed t_max.*shorten"):
        WarmupStableDecayScheduler("300ba", 0.8)(at(state, batch=0))
    with pytest.raises(ValueError, match=r"alpha_f=1.5 is outside \[0, 1\]"):
        WarmupStableDecayScheduler("10ba", 0.2, alpha_f=1.5)
    with pytest.raises(ValueError, match=r"alpha_f=-0.1 is outside"):
        DecayPhaseScheduler(alpha_f=-0.1)
    with pytest.raises(ValueError, match=r"decay_shape 'cos'.*linear, cosine, 1-sqrt, exponential"):
        WarmupStableDecayScheduler("10ba", 0.2, decay_shape="cos")
    with pytest.raises(ValueError, match="needs alpha_f > 0"):
        WarmupStableDecayScheduler("10ba", 0.2, decay_shape="exponential", alpha_f=0.0)
    with pytest.raises(ValueError, match=r"t_decay=1.5 .* must be in \(0, 1\]"):
        WarmupStableDecayScheduler("10ba", 1.5)
    with pytest.raises(ValueError, match="t_warmup='ten batches' is not a Composer time string"):
        WarmupStableDecayScheduler("ten batches", 0.2)
    with pytest.raises(ValueError, match=r"t_decay .* different units"):
        WarmupStableDecayScheduler("10ba", "100tok")(at(state, batch=0))
    with pytest.raises(ValueError, match=r"t_start .* is not before t_max"):
        DecayPhaseScheduler(t_start="1000ba")(at(state, batch=0))
    with pytest.raises(ValueError, match="must use one unit"):
        CosineWithWarmupScheduler("10ba")(at(make_state("1000tok"), batch=0))


def test_registry_names_and_arguments() -> None:
    assert schedulers.names() == [
        "wsd",
        "cosine",
        "decay_phase",
        "linear_with_warmup",
        "constant_with_warmup",
    ]
    with pytest.raises(
        ConfigError, match=r"unknown scheduler 'wds' \(did you mean 'wsd'\?\); registered schedulers: wsd"
    ):
        schedulers.build("wds", {"t_warmup": "1ba", "t_decay": 0.1})
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'scheduler.t_decy' \(from scheduler 'wsd'\) \(did you mean 'scheduler.t_decay'\?\)",
    ):
        schedulers.build("wsd", {"t_warmup": "1ba", "t_decy": 0.1}, where="scheduler")
    with pytest.raises(ConfigError, match=r"scheduler: scheduler 'linear_with_warmup' needs t_warmup"):
        schedulers.build("linear_with_warmup", {}, where="scheduler")
    with pytest.raises(ConfigError, match=r"bad value for config key 'scheduler.decay_shape'.*'cos'.*1-sqrt"):
        schedulers.build("wsd", {"decay_shape": "cos"}, where="scheduler")
    cosine = schedulers.build("cosine", {"t_warmup": "480ba", "alpha_f": 0.1})
    assert cosine(at(make_state("1000ba"), batch=1000)) == pytest.approx(0.1)  # the paper's 2e-4 / 2e-3


def test_the_phase_schedulers_defaults_by_hand() -> None:
    """Built with no argument: the cosine has no warmup and ends at 0; the decay phase is linear from
    the first batch to 0 at max_duration."""
    state = make_state("1000ba")
    cosine = CosineWithWarmupScheduler()
    assert cosine(at(state, batch=0)) == 1.0
    assert cosine(at(state, batch=500)) == pytest.approx(0.5)  # (1 + cos(pi / 2)) / 2
    assert cosine(at(state, batch=1000)) == pytest.approx(0.0, abs=1e-12)
    decay = DecayPhaseScheduler()
    short = make_state("200ba")
    assert decay(at(short, batch=0)) == 1.0
    assert decay(at(short, batch=50)) == pytest.approx(0.75)
    assert decay(at(short, batch=200)) == 0.0
    assert decay.stable_end(short) == Time(0, "ba")
    assert tuple(DecayPhaseScheduler(t_start="100ba").phases(short)) == (
        Time(0, "ba"),
        Time(100, "ba"),
        Time(200, "ba"),
    )


def test_decay_phase_under_a_scale_schedule_ratio() -> None:
    """Composer's contract f_ssr(t) = f(t / ssr) for the decay phase: t_start and t_max stretch."""
    base, scaled = make_state("200ba"), make_state("400ba")
    sched = DecayPhaseScheduler(t_start="100ba", decay_shape="linear", alpha_f=0.1)
    for batch in range(0, 401, 10):
        expected = 1.0 if batch < 200 else 1.0 - 0.9 * (batch - 200) / 200  # by hand, stretched x2
        assert sched(at(scaled, batch=batch), ssr=2.0) == pytest.approx(expected, abs=1e-12), batch
        assert sched(at(scaled, batch=batch), ssr=2.0) == pytest.approx(sched(at(base, batch=batch // 2)))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: DecayPhaseScheduler(t_start="soon"),
            "DecayPhaseScheduler: t_start='soon' is not a Composer time string; write e.g. '1000ba', "
            "'3e7tok', '500sp', '1ep' or '0.2dur'",
        ),
        (
            lambda: DecayPhaseScheduler(t_start="-5ba"),
            "DecayPhaseScheduler: t_start=-5ba is negative; it must be >= 0",
        ),
        (
            lambda: DecayPhaseScheduler(t_max="3ms"),
            "DecayPhaseScheduler: t_max='3ms' is not a Composer time string; write e.g. '1000ba', "
            "'3e7tok', '500sp', '1ep' or '0.2dur'",
        ),
        (
            lambda: DecayPhaseScheduler(alpha_f=1.5),
            "DecayPhaseScheduler: alpha_f=1.5 is outside [0, 1]; it is the final lr as a fraction of the "
            "peak (e.g. 0.1 for a 10x decay, 0 to decay to zero)",
        ),
        (
            lambda: DecayPhaseScheduler(decay_shape="exponential", alpha_f=0.0),
            "DecayPhaseScheduler: decay_shape='exponential' computes alpha_f ** x and needs alpha_f > 0 "
            "(got 0.0); set alpha_f to e.g. 0.01, or pick decay_shape 'linear' to decay to zero",
        ),
    ],
)
def test_every_error_names_the_scheduler_key_value_and_fix(build, message: str) -> None:
    """The whole line a user reads, word for word."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build()


def test_alpha_f_of_one_is_a_valid_schedule_without_decay() -> None:
    assert DecayPhaseScheduler(alpha_f=1.0)(at(make_state("1000ba"), batch=500)) == 1.0
