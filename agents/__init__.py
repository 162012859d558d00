"""Agents: one module per algorithm, a Protocol, small loss functions (README, "Agents and training runs").

``make_agent(name, *, track, annotator=None, seed=0, **config)`` builds any agent by name (built-in,
entry-point plug-in of the group ``align_env.agents``, or ``"module:Class"``); see :mod:`agents.registry`.
"""

from agents.protocol import METRIC_NAMES, Agent, Transitions
from agents.registry import AGENTS, agent_config, agent_names, config_help, configs, make_agent, resolve_agent

__all__ = ["AGENTS", "METRIC_NAMES", "Agent", "Transitions", "agent_config", "agent_names", "config_help", "configs",
           "make_agent", "resolve_agent"]
