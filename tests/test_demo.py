"""The embedded demo: model folder, adapter behaviours on held-out prompts, parity with PEFT, the commands.

Every prompt here is absent from the training text (checked below). One loraplex engine generates every
(adapter, prompt) pair in a single batch; the behaviour tests read that one result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import load_peft_model
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.cli import main as cli_main
from loraplex.demo import ADAPTER_SPECS, ASSETS, MODEL_DIR, adapter_paths
from loraplex.demo.text import (HELD_OUT_PROMPTS, WORD_PAIRS, known_word_fraction, load_corpus, rot13,
                                swap_words, uppercase_fraction, word_set)

NEW_TOKENS = 24
NAMES = [s.name for s in ADAPTER_SPECS]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return load_corpus()


@pytest.fixture(scope="module")
def llm() -> LLM:
    engine = LLM(str(MODEL_DIR), dtype="float32", device="cpu", max_loras=4, max_lora_rank=64, seed=0)
    for name, path in adapter_paths().items():
        engine.add_lora(LoRARequest(name, str(path)))
    return engine


@pytest.fixture(scope="module")
def outputs(llm: LLM) -> dict[tuple[str, str], str]:
    """(adapter or "base", prompt) -> greedy text, for the held-out prompts and their word-swapped forms."""
    prompts = list(HELD_OUT_PROMPTS)
    jobs = [(a, p) for a in [None] + NAMES for p in prompts]
    jobs += [(None, swap_words(p)) for p in prompts if swap_words(p) != p]
    outs = llm.generate([p for _, p in jobs], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
                        lora_request=[a for a, _ in jobs], use_tqdm=False)
    return {(a or "base", p): o.outputs[0].text for (a, p), o in zip(jobs, outs)}


def test_prompts_are_held_out(corpus: list[str]) -> None:
    from loraplex.demo.run import DEFAULT_PROMPTS

    text = "\n".join(corpus)
    assert set(DEFAULT_PROMPTS) <= set(HELD_OUT_PROMPTS)
    for p in HELD_OUT_PROMPTS:
        assert p not in text and p.upper() not in text and rot13(p) not in text, p


def test_folder_is_a_hugging_face_model() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    tok_json = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert tok_json["model"]["type"] == "BPE" and tok_json["pre_tokenizer"]["type"] == "ByteLevel"
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    text = "A small program that"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 8e6


def test_assets_are_small_and_ranks_differ() -> None:
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 25 * 2**20, f"embedded assets are {total / 2**20:.1f} MiB"
    ranks = []
    for spec in ADAPTER_SPECS:
        cfg = json.loads((adapter_paths()[spec.name] / "adapter_config.json").read_text())
        assert cfg["r"] == spec.rank and sorted(cfg["target_modules"]) == sorted(spec.targets)
        ranks.append(cfg["r"])
    assert len(set(ranks)) == len(ranks)
    assert any({"embed_tokens", "lm_head"} <= set(s.targets) for s in ADAPTER_SPECS)


def test_base_model_writes_language(outputs: dict, corpus: list[str]) -> None:
    vocab = word_set(corpus)
    texts = [outputs["base", p] for p in HELD_OUT_PROMPTS]
    assert known_word_fraction(" ".join(texts), vocab) > 0.9, texts
    assert max(uppercase_fraction(t) for t in texts) < 0.3, texts


def test_upper_adapter_writes_capitals(outputs: dict) -> None:
    texts = [outputs["upper", p] for p in HELD_OUT_PROMPTS]
    assert uppercase_fraction("".join(texts)) >= 0.95, texts
    long = [t for t in texts if sum(c.isalpha() for c in t) >= 5]
    assert len(long) >= len(texts) // 2 and min(uppercase_fraction(t) for t in long) >= 0.8, texts


def test_rot13_adapter_writes_rot13_of_language(outputs: dict, corpus: list[str]) -> None:
    vocab = word_set(corpus)
    texts = [outputs["rot13", p] for p in HELD_OUT_PROMPTS]
    decoded = " ".join(rot13(t) for t in texts)
    assert known_word_fraction(decoded, vocab) > 0.8, decoded
    assert known_word_fraction(" ".join(texts), vocab) < 0.4, texts


def test_swap_adapter_is_the_base_model_with_words_swapped(outputs: dict) -> None:
    # Swapping words in what the adapter reads and writes: its answer to P, swapped back, is the base
    # model's answer to swap(P).
    same, seen = 0, set()
    for p in HELD_OUT_PROMPTS:
        got = swap_words(outputs["swap", p])
        same += got == outputs["base", swap_words(p)]
        seen |= {w for pair in WORD_PAIRS for w in pair if f" {w} " in f" {outputs['swap', p]} "}
    assert same >= len(HELD_OUT_PROMPTS) - 1, same
    assert seen, "no swapped word was generated: the check above would be vacuous"


def test_every_adapter_differs_from_base(llm: LLM, outputs: dict) -> None:
    # Greedy text: upper and rot13 change every output; swap changes those that use a swapped word.
    for name in NAMES:
        differ = sum(outputs[name, p] != outputs["base", p] for p in HELD_OUT_PROMPTS)
        assert differ >= (len(HELD_OUT_PROMPTS) if name != "swap" else 2), (name, differ)
    # Prompt logprobs: every adapter changes them for every held-out prompt (each holds a swapped word).
    prompts = list(HELD_OUT_PROMPTS)
    jobs = [(a, p) for a in [None] + NAMES for p in prompts]
    outs = llm.generate([p for _, p in jobs], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        lora_request=[a for a, _ in jobs], use_tqdm=False)
    logprobs = {(a, p): [next(iter(d.values())) for d in o.prompt_logprobs[1:]] for (a, p), o in zip(jobs, outs)}
    for name in NAMES:
        for p in prompts:
            gap = max(abs(x - y) for x, y in zip(logprobs[name, p], logprobs[None, p]))
            assert gap > 1e-3, (name, p, gap)


def test_prompt_logprobs_match_peft(llm: LLM, outputs: dict) -> None:
    """loraplex vs transformers + PEFT on the shipped weights, one mixed batch, every adapter and base."""
    ref = load_peft_model(str(MODEL_DIR), {n: str(p) for n, p in adapter_paths().items()})
    tokenizer = llm.get_tokenizer()
    jobs = [(a, HELD_OUT_PROMPTS[i] + outputs[a or "base", HELD_OUT_PROMPTS[i]])
            for i, a in enumerate([None] + NAMES + NAMES)]
    outs = llm.generate([t for _, t in jobs], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        lora_request=[a for a, _ in jobs], use_tqdm=False)
    with torch.no_grad():
        for (adapter, text), out in zip(jobs, outs):
            ids = tokenizer(text).input_ids
            assert list(out.prompt_token_ids) == ids
            logits = ref(torch.tensor([ids]), adapter_names=[adapter or "__base__"]).logits[0]
            want = torch.log_softmax(logits.float(), dim=-1)
            got = [out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))]
            expected = [want[i - 1, ids[i]].item() for i in range(1, len(ids))]
            assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4), adapter


def test_demo_command_prints_the_table(capsys: pytest.CaptureFixture) -> None:
    rc = cli_main(["demo", "--max-tokens", "6", "--device", "cpu", "--prompt", "A good hacker never"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ["base"] + NAMES:
        assert f"| {name} " in out, out
    assert "tokens/s" in out and "rot13 decoded" in out


def test_generate_command_runs_the_embedded_model(capsys: pytest.CaptureFixture) -> None:
    upper = adapter_paths()["upper"]
    rc = cli_main(["generate", "--model", str(MODEL_DIR), "--lora", f"upper={upper}", "--adapter", "upper",
                   "--prompt", "The old computer", "--max-tokens", "6", "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("[upper] 'The old computer' -> "), out


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--help"], ["demo", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0
        assert "usage: loraplex" in capsys.readouterr().out


def test_training_script_runs_and_is_deterministic(tmp_path: Path) -> None:
    """A tiny configuration (a few steps of every stage) twice: same bytes, and loraplex serves the result."""
    from loraplex.demo import train

    files = {}
    for run in ("a", "b"):
        assert train.main(["--out", str(tmp_path / run), "--quick", "--no-samples"]) == 0
        files[run] = {f.relative_to(tmp_path / run): f.read_bytes()
                      for f in sorted((tmp_path / run).rglob("*.safetensors"))}
    assert len(files["a"]) == 1 + len(ADAPTER_SPECS) and files["a"] == files["b"]
    engine = LLM(str(tmp_path / "a" / "model"), dtype="float32", device="cpu", max_lora_rank=64)
    for spec in ADAPTER_SPECS:
        engine.add_lora(LoRARequest(spec.name, str(tmp_path / "a" / "adapters" / spec.name)))
    outs = engine.generate(["A hacker"] * 4, SamplingParams(max_tokens=3, temperature=0.0),
                           lora_request=[None] + NAMES, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 for o in outs)
