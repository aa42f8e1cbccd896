"""loraplex.envs: every LORAPLEX_* variable the code reads is declared there, parsed strictly, and listed in
docs/architecture.md's table of switches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loraplex import envs

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"LORAPLEX_[A-Z0-9_]+")


def test_every_variable_the_code_names_is_declared_and_every_declared_one_is_read() -> None:
    named: dict[str, set[str]] = {}
    for path in (ROOT / "loraplex").rglob("*.py"):
        if path.name == "envs.py":
            continue
        for name in NAME.findall(path.read_text()):
            named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    read = {n for n in envs.SWITCHES if any(f"envs.{n}" in p.read_text() for p in (ROOT / "loraplex").rglob("*.py"))}
    assert set(named) <= set(envs.SWITCHES), {n: sorted(f) for n, f in named.items() if n not in envs.SWITCHES}
    assert read == set(envs.SWITCHES)  # no switch that nothing reads


def test_the_architecture_table_lists_every_switch() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Environment switches"):text.index("## Measured and not kept")]
    assert set(envs.SWITCHES) - {"LORAPLEX_API_KEY"} <= set(NAME.findall(table))


def test_values_parse_strictly_and_default_when_unset(monkeypatch) -> None:
    for name in envs.SWITCHES:
        monkeypatch.delenv(name, raising=False)
        assert getattr(envs, name) == envs.SWITCHES[name].default
    assert envs.LORAPLEX_LORA_FOLD_DELTA is True and envs.LORAPLEX_MIXED_GRAPH_STEP == 64
    assert envs.LORAPLEX_LORA_OVERLAP is None  # unset: the backend decides by the tensor-parallel size
    for raw, want in [("0", False), ("off", False), ("False", False), ("1", True), (" yes ", True), ("ON", True)]:
        monkeypatch.setenv("LORAPLEX_LORA_FOLD_DELTA", raw)
        assert envs.LORAPLEX_LORA_FOLD_DELTA is want, raw
    monkeypatch.setenv("LORAPLEX_LORA_FOLD_DELTA", "")  # empty: the default
    assert envs.LORAPLEX_LORA_FOLD_DELTA is True
    bad = [("LORAPLEX_LORA_FOLD_DELTA", "maybe", "expected 1 or 0"),
           ("LORAPLEX_MIXED_GRAPH_STEP", "40", "expected a multiple of 16"),
           ("LORAPLEX_MIXED_GRAPH_STEP", "-16", "expected an integer >= 0"),
           ("LORAPLEX_MIXED_GRAPH_TOKENS", "2k", "expected an integer"),
           ("LORAPLEX_ADMIT_LOADING", "soon", "expected one of 0, 1, next")]
    for name, raw, why in bad:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError, match=re.escape(f"{name}={raw!r}: {why}")):
            getattr(envs, name)
        monkeypatch.delenv(name)
    monkeypatch.setenv("LORAPLEX_ADMIT_LOADING", "NEXT")
    assert envs.LORAPLEX_ADMIT_LOADING == "next"
    with pytest.raises(AttributeError, match="LORAPLEX_NO_SUCH"):
        envs.LORAPLEX_NO_SUCH  # noqa: B018
    with pytest.raises(KeyError, match="unknown loraplex environment variable 'LORAPLEX_NO_SUCH'"):
        envs.get("LORAPLEX_NO_SUCH")


def test_a_bad_value_stops_the_engine_with_the_variable_named(tmp_path, monkeypatch) -> None:
    from helpers import make_tiny_model

    from loraplex import LLM

    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    monkeypatch.setenv("LORAPLEX_LORA_FOLD_DELTA", "perhaps")
    with pytest.raises(ValueError, match="LORAPLEX_LORA_FOLD_DELTA='perhaps'"):
        LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=16, block_size=4, lora_backend="triton",
            max_loras=1, max_lora_rank=8)
