"""The fused CPU selective scan against the PyTorch loop and a float64 step-by-step recurrence."""

from __future__ import annotations

import pytest
import torch

from models import cpu_scan, ops
from tests.test_ops import mamba1_recurrence_f64

# The fused kernel's own tests need it built (a C compiler); the PyTorch fallback is tested everywhere,
# forced with MAMBA_RECIPES_CPU_SCAN=torch or a missing compiler, whether or not a compiler exists.
needs_fused = pytest.mark.skipif(not cpu_scan.status()[0], reason=cpu_scan.status()[1])


@pytest.fixture
def forced_fallback(monkeypatch: pytest.MonkeyPatch):
    """The PyTorch loop forced through the documented switch; the fused kernel must not be called."""

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran although MAMBA_RECIPES_CPU_SCAN=torch")

    monkeypatch.setenv(cpu_scan.ENV_SWITCH, "torch")
    monkeypatch.setattr(cpu_scan, "selective_scan_fused", refuse)
    cpu_scan._load.cache_clear()
    yield
    monkeypatch.undo()
    cpu_scan._load.cache_clear()


def make_inputs(b: int, d: int, n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "u": randn(b, d, length),
        "delta": randn(b, d, length),
        "A": -torch.rand(d, n, generator=gen) * 2 - 0.2,
        "B": randn(b, n, length),
        "C": randn(b, n, length),
        "D": randn(d),
        "z": randn(b, d, length),
        "delta_bias": randn(d) * 0.5,
    }


def run(scan, inputs: dict[str, torch.Tensor], dout: torch.Tensor, **options) -> tuple[torch.Tensor, ...]:
    """y, last state and the gradient of <y, dout> for every input."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, last = scan(**leaves, return_last_state=True, **options)
    (y * dout).sum().backward()
    return (y.detach(), last.detach(), *(leaves[k].grad for k in inputs))


@needs_fused
# Lengths: one step, odd, exactly one chunk, several chunks with a partial last one.
@pytest.mark.parametrize(
    ("b", "d", "n", "length"), [(1, 3, 4, 1), (2, 5, 16, 13), (1, 4, 8, cpu_scan.CHUNK), (3, 7, 16, 150)]
)
def test_fused_matches_loop_and_float64(b: int, d: int, n: int, length: int) -> None:
    inputs = make_inputs(b, d, n, length)
    dout = torch.randn(b, d, length)
    fused = run(cpu_scan.selective_scan_fused, inputs, dout, delta_softplus=True)
    loop = run(ops.selective_scan_ref, inputs, dout, delta_softplus=True)
    names = ["y", "last_state", *inputs]
    for name, a, ref in zip(names, fused, loop):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4, msg=f"{name} differs from the loop")
    # The float64 recurrence is written independently of both (tests/test_ops.py).
    leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    y64, last64 = mamba1_recurrence_f64(
        *(leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    )
    (y64 * dout.double()).sum().backward()
    for name, a, ref in zip(names, fused, (y64, last64, *(leaves[k].grad for k in inputs))):
        torch.testing.assert_close(a.double(), ref.detach(), rtol=1e-4, atol=1e-4, msg=f"{name} vs float64")


@needs_fused
@pytest.mark.parametrize(
    ("use_z", "use_D", "use_bias", "softplus"),
    [(False, False, False, False), (True, False, True, False), (False, True, False, True)],
)
def test_optional_arguments(use_z: bool, use_D: bool, use_bias: bool, softplus: bool) -> None:
    inputs = make_inputs(2, 6, 8, 70, seed=1)
    if not softplus:  # a positive step without softplus
        inputs["delta"] = inputs["delta"].abs() * 0.3
    for key, used in (("z", use_z), ("D", use_D), ("delta_bias", use_bias)):
        if not used:
            del inputs[key]
    if use_bias and not softplus:
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    dout = torch.randn(2, 6, 70)
    fused = run(cpu_scan.selective_scan_fused, inputs, dout, delta_softplus=softplus)
    loop = run(ops.selective_scan_ref, inputs, dout, delta_softplus=softplus)
    for name, a, ref in zip(["y", "last_state", *inputs], fused, loop):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4, msg=f"{name} differs from the loop")


@needs_fused
def test_thread_count_does_not_change_results() -> None:
    """Work is split by (batch, channel block), never by thread: 1 and 2 threads agree bit for bit."""
    inputs = make_inputs(4, 40, 16, 200, seed=2)
    dout = torch.randn(4, 40, 200)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(cpu_scan.selective_scan_fused, inputs, dout, delta_softplus=True)
        torch.set_num_threads(2)
        two = run(cpu_scan.selective_scan_fused, inputs, dout, delta_softplus=True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_fused
def test_saves_chunk_states_not_every_state() -> None:
    """What the backward keeps is the inputs plus one state per chunk: no (b, d, l, n) tensor."""
    b, d, n, length = 2, 64, 16, 1000
    inputs = {k: v.requires_grad_(True) for k, v in make_inputs(b, d, n, length).items()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cpu_scan.selective_scan_fused(**inputs, delta_softplus=True)
    saved_floats = sum(t.numel() for t in saved)
    chunks = -(-length // cpu_scan.CHUNK)
    # u, delta, z (b, d, l); B, C (b, l, n); A (d, n); D, delta_bias (d); states (b, d, chunks, n).
    expected = 3 * b * d * length + 2 * b * length * n + d * n + 2 * d + b * d * chunks * n
    assert saved_floats == expected
    assert saved_floats < b * d * length * n / 2  # the loop keeps more than all the states


@needs_fused
def test_ops_dispatches_to_fused_and_loop_for_float64() -> None:
    inputs = make_inputs(1, 4, 4, 9)
    y = ops.selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(
        y, cpu_scan.selective_scan_fused(**inputs, delta_softplus=True), rtol=0, atol=0
    )
    y64 = ops.selective_scan(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert y64.dtype == torch.float64


def test_fallback_without_compiler_logs_reason(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cpu_scan, "CFLAGS", (*cpu_scan.CFLAGS, "-DFORCE_NEW_KEY"))  # no cached library
    cpu_scan._load.cache_clear()
    cpu_scan._log_fallback_once.cache_clear()
    try:
        ok, reason = cpu_scan.status()
        assert not ok
        assert "CC=/nonexistent/cc is not an executable" in reason
        assert "PyTorch loop" in reason
        inputs = make_inputs(1, 3, 4, 5)
        with caplog.at_level("WARNING", logger="models.cpu_scan"):
            y = ops.selective_scan(**inputs, delta_softplus=True)
        assert "fused CPU scan unavailable" in caplog.text
        torch.testing.assert_close(y, ops.selective_scan_ref(**inputs, delta_softplus=True))
    finally:
        monkeypatch.undo()
        cpu_scan._load.cache_clear()


@needs_fused
def test_failed_build_names_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_scan, "CFLAGS", (*cpu_scan.CFLAGS, "-fno-such-option-anywhere"))
    with pytest.raises(RuntimeError, match=r"compiling cpu_scan\.c failed.*no-such-option-anywhere"):
        cpu_scan.build()


def test_env_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_scan.ENV_SWITCH, "torch")
    cpu_scan._load.cache_clear()
    try:
        ok, reason = cpu_scan.status()
        assert not ok and f"{cpu_scan.ENV_SWITCH}=torch" in reason
    finally:
        monkeypatch.undo()
        cpu_scan._load.cache_clear()


@needs_fused
def test_doctor_says_which_scan_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from recipes import doctor

    assert dict(doctor.rows())["CPU scan, Mamba-1"].startswith("fused C kernel (cpu_scan-")
    monkeypatch.setenv(cpu_scan.ENV_SWITCH, "torch")
    cpu_scan._load.cache_clear()
    try:
        assert dict(doctor.rows())["CPU scan, Mamba-1"].startswith("PyTorch loop (models/ops.py): ")
    finally:
        monkeypatch.undo()
        cpu_scan._load.cache_clear()


@pytest.mark.parametrize(("b", "d", "n", "length"), [(1, 3, 4, 1), (2, 5, 16, 70)])
def test_forced_fallback_matches_float64(forced_fallback: None, b: int, d: int, n: int, length: int) -> None:
    """What ops.selective_scan computes on the PyTorch loop (float32): the float64 recurrence, values
    and gradients, on any machine."""
    assert cpu_scan.status() == (False, f"{cpu_scan.ENV_SWITCH}=torch: the PyTorch loop (models/ops.py) runs")
    assert not cpu_scan.available()
    inputs = make_inputs(b, d, n, length, seed=3)
    dout = torch.randn(b, d, length)
    got = run(ops.selective_scan, inputs, dout, delta_softplus=True)
    leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    y64, last64 = mamba1_recurrence_f64(
        *(leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    )
    (y64 * dout.double()).sum().backward()
    names = ["y", "last_state", *inputs]
    for name, a, ref in zip(names, got, (y64, last64, *(leaves[k].grad for k in inputs))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), ref.detach(), rtol=1e-4, atol=1e-4, msg=f"{name} vs float64")


def test_forced_fallback_trains_a_model(forced_fallback: None) -> None:
    """A Mamba-1 model's loss and gradients on the forced PyTorch loop equal those of the float64 model."""
    from models.config import preset
    from models.mamba_lm import MambaLMHeadModel

    model = MambaLMHeadModel(preset("debug", n_layer=2, impl="torch"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def loss_and_grads(m: MambaLMHeadModel) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        grads = torch.autograd.grad(loss, list(m.parameters()))
        return loss.detach(), [g.clone() for g in grads]

    loss32, grads32 = loss_and_grads(model)
    loss64, grads64 = loss_and_grads(model.double())  # float64 runs the loop whatever the switch says
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-5)
    for a, ref in zip(grads32, grads64):
        torch.testing.assert_close(a.double(), ref, rtol=1e-3, atol=1e-5)
