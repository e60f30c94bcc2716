"""Needle-in-a-haystack: prompts of exact length, the expected heatmap from a model of known reach,
and real models (ours through the recurrent prefill, an HF transformer) end to end."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from common.cli import UserError
from data import passkey
from eval import needle
from handover.hf_mamba import export_hf
from models.config import preset
from models.mamba_lm import MambaLMHeadModel
from tests.data_helpers import make_tokenizer

WORDS = ["the", "river", "light", "city", "learns", "quietly", "builds", "strong", "morning", "data"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("needle")
    rng = random.Random(0)
    sentences = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + "." for _ in range(900)
    ]
    haystack = root / "haystack.txt"
    haystack.write_text(" ".join(sentences), encoding="utf-8")
    return {"tokenizer": make_tokenizer(root / "tok", vocab_size=400), "haystack": haystack}


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class ReachStub:
    """Answers with the pass key exactly when the whole needle lies in the last ``reach`` tokens."""

    def __init__(self, tok, reach: int) -> None:
        self.tok, self.reach = tok, reach

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        window = self.tok.decode(prompt[-self.reach :])
        found = re.search(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", window)
        answer = f" {found.group(1)}." if found else " 0."
        return self.tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]


def find(sequence: list[int], part: list[int]) -> int:
    return next(i for i in range(len(sequence) - len(part) + 1) if sequence[i : i + len(part)] == part)


def test_stub_of_known_reach_gives_the_expected_heatmap(files: dict[str, Path]) -> None:
    tok = hf_tokenizer(files["tokenizer"])
    prompts = needle.Prompts(tok, needle.haystack_tokens(tok, str(files["haystack"]), 1200))
    depths = needle.depth_grid(5)
    assert depths == [0.0, 0.25, 0.5, 0.75, 1.0]
    trials = needle.run_needle(ReachStub(tok, 400), prompts, [300, 600, 1200], depths, progress=False)
    for t in trials:
        prompt, start = prompts.build(t.length, t.depth, t.number)
        assert len(prompt) == t.length and start == t.needle_start
        needle_ids = prompts.encode(" " + passkey.NEEDLE.format(number=t.number))
        assert find(prompt, needle_ids) == t.needle_start
        assert prompt[-len(prompts.question) :] == prompts.question
        assert 1 <= t.number <= 50000
    # By hand: the window is the last 400 tokens; ~25 tokens of needle and question leave a haystack
    # of ~L - 25, with the needle near depth * (L - 25). At 300 it is always inside; at 600 from
    # depth 0.5 (~290 >= 200); at 1200 from depth 0.75 (~880 >= 800).
    _, lengths, grid = needle.accuracy_grid(trials)
    assert lengths == [300, 600, 1200]
    assert grid == [
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0],
        [1.0, 1.0, 1.0],
        [1.0, 1.0, 1.0],
    ]


def test_needle_goes_after_a_sentence_end(files: dict[str, Path]) -> None:
    tok = hf_tokenizer(files["tokenizer"])
    prompts = needle.Prompts(tok, needle.haystack_tokens(tok, str(files["haystack"]), 800))
    prompt, start = prompts.build(800, 0.5, 123)
    assert tok.decode(prompt[start - 1 : start]).rstrip().endswith(".")
    assert abs(start - 0.5 * (800 - len(prompts.question) - 25)) < needle.SENTENCE_SEARCH + 10
    with pytest.raises(UserError, match="shorter than the needle"):
        prompts.build(20, 0.5, 1)


def test_recurrent_prefill_decodes_like_the_full_forward(files: dict[str, Path]) -> None:
    model = MambaLMHeadModel(preset("debug", vocab_size=400)).eval()
    tok = hf_tokenizer(files["tokenizer"])
    prompts = needle.Prompts(tok, needle.haystack_tokens(tok, str(files["haystack"]), 256))
    prompt, _ = prompts.build(256, 0.3, 4242)
    fast = needle.RecurrentGreedy(model, eos_token_id=None).greedy(prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence again for every token
            ids.append(int(model(torch.tensor([ids]))[0, -1, :400].argmax()))
    assert fast == ids[len(prompt) :]


def test_tiny_mamba_end_to_end_up_to_4096(files: dict[str, Path], tmp_path: Path) -> None:
    model = MambaLMHeadModel(preset("debug", vocab_size=400))
    hf = export_hf(model, tmp_path / "hf", tokenizer_dir=files["tokenizer"])
    out = tmp_path / "out"
    needle.main([str(hf), "--haystack", str(files["haystack"]), "--out", str(out), "--lengths", "256,1024,4096",
                 "--depths", "2", "--train-length", "512", "--no-progress"])  # fmt: skip
    record = json.loads((out / "trials.json").read_text())
    assert record["lengths"] == [256, 1024, 4096] and record["depths"] == [0.0, 1.0]
    assert [(t["length"], t["depth"]) for t in record["trials"]] == [
        (n, d) for n in (256, 1024, 4096) for d in (0.0, 1.0)
    ]
    draws = random.Random(0)  # --seed 0: one number per cell, in order
    for t in record["trials"]:
        assert t["number"] == draws.randint(1, 50000)
        # An untrained model does not know a 5-digit number it saw once: every answer is wrong.
        said = re.search(r"\d+", t["answer"])
        assert t["correct"] is False and (said is None or int(said.group()) != t["number"])
    assert record["accuracy"] == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]] and record["overall"] == 0.0
    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_records_the_grid_of_a_model_of_known_reach(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trials.json of the command: which trials are right, the grid and the overall score, against the
    hand-derived reach of the stub (see the heatmap test above: 10 of 15 cells within 400 tokens)."""
    tok = hf_tokenizer(files["tokenizer"])
    monkeypatch.setattr(needle, "load_lm", lambda *args: (ReachStub(tok, 400), tok))
    out = tmp_path / "out"
    needle.main(["stub", "--haystack", str(files["haystack"]), "--out", str(out), "--lengths", "300,600,1200",
                 "--depths", "5", "--no-progress"])  # fmt: skip
    record = json.loads((out / "trials.json").read_text())
    right = {(1200, 0.75), (1200, 1.0), (600, 0.5), (600, 0.75), (600, 1.0)} | {
        (300, d) for d in record["depths"]
    }
    for t in record["trials"]:
        assert t["correct"] == ((t["length"], t["depth"]) in right), t
        assert t["answer"] == (f" {t['number']}." if t["correct"] else " 0.")
    assert record["accuracy"] == [
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0],
        [1.0, 1.0, 1.0],
        [1.0, 1.0, 1.0],
    ]
    assert record["overall"] == pytest.approx(10 / 15)


def test_any_hf_causal_lm_runs_through_its_own_generate(files: dict[str, Path], tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = hf_tokenizer(files["tokenizer"])
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2)
    gpt2 = GPT2LMHeadModel(config).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    lm, loaded_tok = needle.load_lm(str(tmp_path / "gpt2"), None, None, torch.device("cpu"))
    assert isinstance(lm, needle.HFGreedy)
    prompts = needle.Prompts(loaded_tok, needle.haystack_tokens(loaded_tok, str(files["haystack"]), 300))
    prompt, _ = prompts.build(300, 0.5, 777)
    out = lm.greedy(prompt, 5)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            next_id = int(gpt2(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == tok.eos_token_id:
                break
    assert out == ids[len(prompt) :]


def test_passkey_documents_carry_needle_question_and_answer(files: dict[str, Path], tmp_path: Path) -> None:
    passkey.main(["--haystack", str(files["haystack"]), "--out", str(tmp_path / "pk"), "--count", "20",
                  "--min-words", "20", "--max-words", "60"])  # fmt: skip
    docs = [json.loads(line)["text"] for line in (tmp_path / "pk" / "passkey.jsonl").open()]
    assert len(docs) == 20
    for doc in docs:
        body, question = doc.rsplit("\n", 1)
        number = int(re.search(r"The pass key is (\d+)\.", body).group(1))
        assert passkey.NEEDLE.format(number=number) in body
        assert question == passkey.QUESTION + passkey.answer_text(number)
    again = tmp_path / "pk2"
    passkey.main(["--haystack", str(files["haystack"]), "--out", str(again), "--count", "20",
                  "--min-words", "20", "--max-words", "60"])  # fmt: skip
    assert (again / "passkey.jsonl").read_bytes() == (tmp_path / "pk" / "passkey.jsonl").read_bytes()


def test_spaced_pass_keys_are_written_found_and_scored_in_their_style(files: dict[str, Path]) -> None:
    assert passkey.number_text(31415, "spaced") == "3 1 4 1 5" and passkey.number_text(7, "spaced") == "7"
    assert passkey.parse_number(" 3 1 4 1 5. 9", "spaced") == 31415
    assert passkey.parse_number(" 3 1 4 1 5.", "plain") == 3  # the plain reading stops at the space
    assert passkey.parse_number(" none", "spaced") is None
    tok = hf_tokenizer(files["tokenizer"])
    prompts = needle.Prompts(tok, needle.haystack_tokens(tok, str(files["haystack"]), 600), digits="spaced")
    prompt, start = prompts.build(300, 0.5, 407)
    assert "The pass key is 4 0 7. Remember it. 4 0 7 is the pass key." in tok.decode(prompt)
    assert find(prompt, prompts.encode(" The pass key is 4 0 7.")) == start

    class SpacedReach(ReachStub):  # answers "4 0 7." when the spaced needle is within reach
        def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
            found = re.search(r"The pass key is ([\d ]+)\.", self.tok.decode(prompt[-self.reach :]))
            answer = f" {found.group(1)}." if found else " 0."
            return self.tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]

    trials = needle.run_needle(
        SpacedReach(tok, 200), prompts, [150, 600], [0.0, 1.0], progress=False, max_number=999
    )
    assert all(1 <= t.number <= 999 and t.seconds >= 0 for t in trials)
    assert [(t.length, t.depth, t.correct) for t in trials] == [
        (150, 0.0, True), (150, 1.0, True), (600, 0.0, False), (600, 1.0, True)
    ]  # fmt: skip
    assert all(passkey.parse_number(t.answer, "spaced") == t.number for t in trials if t.correct)


def test_filler_passkey_documents_fit_the_design(tmp_path: Path) -> None:
    passkey.main(["--filler", "--out", str(tmp_path / "pk"), "--count", "50", "--min-words", "10",
                  "--max-words", "45", "--max-number", "999", "--digits", "spaced"])  # fmt: skip
    filler = (tmp_path / "pk" / "filler.txt").read_text()
    assert filler.startswith(passkey.FILLER + " " + passkey.FILLER)
    numbers = []
    for line in (tmp_path / "pk" / "passkey.jsonl").open():
        body, question = json.loads(line)["text"].rsplit("\n", 1)
        found = re.search(r"The pass key is ((?:\d )*\d)\. Remember it\. \1 is the pass key\.", body)
        number = int(found.group(1).replace(" ", ""))
        numbers.append(number)
        assert question == f"{passkey.QUESTION} {found.group(1)}."
        haystack = (body[: found.start()] + body[found.end() :]).split()
        assert 10 <= len(haystack) <= 45
        assert " ".join(haystack) in (passkey.FILLER + " ") * 4  # a window of the filler, nothing else
    assert min(numbers) >= 1 and max(numbers) <= 999 and len(set(numbers)) > 40


def test_table_over_models_and_seeds_matches_a_hand_count(tmp_path: Path) -> None:
    from eval import needle_table

    def write(run: str, correct: dict[int, list[bool]], seconds: float) -> Path:
        trials = [
            {"length": n, "depth": d, "correct": c, "seconds": seconds}
            for n, cells in correct.items()
            for d, c in zip((0.0, 1.0), cells, strict=True)
        ]
        grid = [[float(correct[n][i]) for n in (128, 512)] for i in range(2)]
        record = {"lengths": [128, 512], "depths": [0.0, 1.0], "train_length": 128, "accuracy": grid,
                  "trials": trials}  # fmt: skip
        folder = tmp_path / run / "needle"
        folder.mkdir(parents=True)
        (folder / "trials.json").write_text(json.dumps(record))
        return folder

    folders = [
        write("mamba-s0", {128: [True, True], 512: [True, False]}, 0.5),
        write("mamba-s1", {128: [True, False], 512: [False, False]}, 1.5),
        write("attention-s0", {128: [True, True], 512: [False, False]}, 0.25),
    ]
    out = tmp_path / "summary"
    needle_table.main([*map(str, folders), "--out", str(out)])
    # By hand: mamba at 128: seeds 1.0 and 0.5 -> mean 0.75, sample sd 0.354; at 512: 0.5 and 0.0 ->
    # 0.25 ± 0.354; 512-token wall time: 2 x 0.5 s and 2 x 1.5 s -> mean 2.0 s. One attention seed: no spread.
    assert (out / "table.md").read_text().splitlines() == [
        "| model | seeds | 1x (128) | 4x (512) | 4x (512) wall s |",
        "| --- | --- | ---: | ---: | ---: |",
        "| mamba | 2 | 0.75 ± 0.35 | 0.25 ± 0.35 | 2.0 |",
        "| attention | 1 | 1.00 ± - | 0.00 ± - | 0.5 |",
    ]
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match=r"trials\.json does not exist"):
        needle_table.main([str(tmp_path / "nothing"), "--out", str(out)])
