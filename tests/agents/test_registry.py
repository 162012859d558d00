"""The agent registry: built-ins, entry-point plug-ins, dotted specs, did-you-mean errors, config keys."""

from __future__ import annotations

import dataclasses

import pytest

import agents
from agents import AGENTS, make_agent
from agents.registry import ENTRY_POINT_GROUP, agent_names, config_help, resolve_agent
from align_env.errors import AlignEnvError, UnknownNameError
from tests.agents.helpers import WordsAgent


def test_builtin_names_resolve_to_classes_with_a_documented_config():
    assert set(AGENTS) == {"initial", "online-dpo", "offline-dpo", "best-of-n", "rlsf-ppo", "sail", "self-rewarding"}
    for name in AGENTS:
        cls = resolve_agent(name)
        assert cls.name == name and dataclasses.is_dataclass(cls.Config)
        for field_name, _, _, help_text in config_help(name):
            assert help_text, f"{name}.{field_name} has no help text"
    assert set(agents.configs()) == set(AGENTS)


def test_unknown_agent_suggests_close_names():
    with pytest.raises(UnknownNameError, match=r"unknown agent 'onlne-dpo'\. Did you mean 'online-dpo'"):
        resolve_agent("onlne-dpo")
    with pytest.raises(UnknownNameError, match="Known: best-of-n, initial, offline-dpo, online-dpo, rlsf-ppo, sail, self-rewarding"):
        make_agent("ppo", track="helpful")


def test_dotted_spec_builds_a_third_party_agent():
    agent = make_agent("tests.agents.helpers:WordsAgent", track="helpful", seed=3, words=2)
    assert isinstance(agent, WordsAgent) and agent.config.words == 2 and agent.seed == 3
    assert isinstance(agent, agents.Agent)  # the runtime-checkable protocol
    with pytest.raises(UnknownNameError, match="Did you mean 'WordsAgent'"):
        resolve_agent("tests.agents.helpers:WordAgent")
    with pytest.raises(AlignEnvError, match="cannot import module 'tests.agents.nowhere'"):
        resolve_agent("tests.agents.nowhere:Agent")


def test_entry_point_plugin_is_found(tmp_path, monkeypatch):
    """A real installed-distribution record (dist-info with entry_points.txt) on sys.path."""
    dist = tmp_path / "words_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: words-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nwords = tests.agents.helpers:WordsAgent\n"
        "online-dpo = tests.agents.helpers:WordsAgent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "words" in agent_names()
    assert resolve_agent("words") is WordsAgent
    assert resolve_agent("online-dpo").__name__ == "OnlineDPO"  # a plug-in never shadows a built-in
    with pytest.raises(UnknownNameError, match="Did you mean 'words'"):
        resolve_agent("wordz")


def test_bad_config_keys_and_values_are_clear():
    with pytest.raises(AlignEnvError, match=r"no config field 'wrds'\. Did you mean 'words'\? Valid fields: words, "):
        make_agent("tests.agents.helpers:WordsAgent", track="helpful", wrds=2)
    with pytest.raises(AlignEnvError, match=r"no config field 'lrr'\. Did you mean 'lr'"):
        make_agent("online-dpo", track="helpful", lrr=1e-5)
    with pytest.raises(AlignEnvError, match="expects int"):
        make_agent("tests.agents.helpers:WordsAgent", track="helpful", words="many")
    # Strings from a command line are coerced to the field's type.
    assert make_agent("tests.agents.helpers:WordsAgent", track="helpful", words="5").config.words == 5


def test_config_validation_names_the_problem():
    from agents.best_of_n import BestOfNConfig
    from agents.offline_dpo import OfflineDPOConfig
    from agents.online_dpo import OnlineDPOConfig

    with pytest.raises(UnknownNameError, match="Did you mean 'ipo'"):
        OnlineDPOConfig(loss="ipoo")
    with pytest.raises(AlignEnvError, match="grad_accum >= 1"):
        OnlineDPOConfig(grad_accum=0)
    assert OnlineDPOConfig(loss="slic").beta == 0.002 and OnlineDPOConfig(loss="ipo").beta == 1.0
    assert OnlineDPOConfig(lora=True).lr == 5e-5 and OnlineDPOConfig(lora=False).lr == 5e-7
    with pytest.raises(UnknownNameError, match="Did you mean 'track'"):
        OfflineDPOConfig(pairs="tracks")
    with pytest.raises(UnknownNameError, match="Did you mean 'score'"):
        BestOfNConfig(select="scores")


def test_length_control_reaches_the_annotator_spec():
    from agents.online_dpo import with_length_control
    from align_env.feedback import parse_spec

    spec = with_length_control("smollm2-135m:llm_judge?engine=transformers", "Prefer the shorter answer.")
    parsed = parse_spec(spec)
    assert parsed.params == {"engine": "transformers", "suffix": "Prefer the shorter answer."}
    assert parse_spec(with_length_control("rules", "short please")).params == {"prefer": "short"}
    assert with_length_control("rules", "") == "rules"
    with pytest.raises(AlignEnvError, match="'likelihood' takes no length-control"):
        with_length_control("smollm2-135m:likelihood", "shorter")
