"""Command-line help: every flag says what it does, its default and its environment variable; every config
field is documented (its text is the flag's help)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest

from loraplex.cli import build_parser
from loraplex.config import (CacheConfig, DeviceConfig, EngineConfig, LoRAConfig, ModelConfig, ParallelConfig,
                             SchedulerConfig, ServerConfig, config_fields)

CONFIGS = (ModelConfig, DeviceConfig, CacheConfig, SchedulerConfig, LoRAConfig, ParallelConfig, ServerConfig)
COMMANDS = ("serve", "generate", "demo")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def expanded_help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` prints it (argparse fills in ``%(default)s`` and friends)."""
    return action.help % {**vars(action), "prog": prog}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_is_documented(cls: type) -> None:
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f"{cls.__name__}.{f.name} has no metadata help"
        assert "\n" not in text, f"{cls.__name__}.{f.name}: help must be one line"


def test_every_engine_section_is_checked() -> None:
    # A new section of EngineConfig must join CONFIGS, so its fields are held to the test above.
    assert set(typing.get_type_hints(EngineConfig).values()) == set(CONFIGS) - {ServerConfig}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_config_flags_show_their_default(command: str) -> None:
    parser = subcommands()[command]
    documented = {f.name: f for cls in CONFIGS for f in dataclasses.fields(cls)}
    seen = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest}: no help"
        text = expanded_help(action, parser.prog)
        if action.option_strings and action.dest in documented and not action.required:  # generated flags
            f = documented[action.dest]
            assert text.startswith(f.metadata["help"]), (command, action.dest, text)
            assert f"(default: {action.default}" in text, (command, action.dest, text)
            if "env" in f.metadata:
                assert f"env: {f.metadata['env']}" in text
            seen += 1
    assert seen >= len([f for _, f in config_fields()]) - 1  # every engine field but model is a flag


def test_demo_help_shows_its_own_dtype_default() -> None:
    demo = subcommands()["demo"]
    (dtype,) = [a for a in demo._actions if a.dest == "dtype"]
    assert "(default: float32)" in expanded_help(dtype, demo.prog)


def test_api_key_help_names_the_environment_variable() -> None:
    serve = subcommands()["serve"]
    (action,) = [a for a in serve._actions if "--api-key" in a.option_strings]
    assert "LORAPLEX_API_KEY" in expanded_help(action, serve.prog)


def test_boolean_flags_have_help() -> None:
    serve = subcommands()["serve"]
    (action,) = [a for a in serve._actions if "--allow-remote-images" in a.option_strings]
    assert "--no-allow-remote-images" in action.option_strings
    assert "(default: False)" in expanded_help(action, serve.prog)


def test_serve_help_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LORAPLEX_API_KEY" in proc.stdout and "--chat-template" in proc.stdout
    assert "--max-seqs-per-request" in proc.stdout
