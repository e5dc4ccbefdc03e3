"""The profile's `agent_apis:` section: how the Anthropic Messages and OpenAI Responses routes name the
served model and keep stored responses.

    agent_apis:
      model_aliases: {"claude-*": null}   # fnmatch pattern -> served model name (null: the served model)
      responses_store: true               # false: `store` is ignored, nothing is kept
      responses_max_stored: 10000         # per API key; the oldest beyond this are deleted
      responses_max_age_s: 2592000        # 30 days; older ones are deleted
      responses_path: responses.sqlite    # relative: under the state directory
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config_schema import ConfigError, build_section
from server.errors import model_not_found
from server.usage import state_dir


@dataclass(frozen=True, slots=True)
class AgentApisConfig:
    """How /v1/messages and /v1/responses name the served model and keep stored responses."""

    # model-name pattern (fnmatch) -> the served model's name (null: the served model), e.g. Claude Code's
    model_aliases: dict[str, str | None] = field(default_factory=lambda: {"claude-*": None})
    responses_store: bool = True  # false: a request's `store` is ignored, nothing is kept
    responses_max_stored: int = 10_000  # stored responses per API key; the oldest beyond this are deleted
    responses_max_age_s: float = 30 * 86400.0  # stored responses older than this are deleted (30 days)
    responses_path: str = "responses.sqlite"  # the response store; relative: under the state directory

    def resolved_path(self) -> Path:
        path = Path(self.responses_path).expanduser()
        return path if path.is_absolute() else state_dir() / path


def parse_agent_apis_config(section: dict[str, Any] | None) -> AgentApisConfig:
    cfg: AgentApisConfig = build_section(AgentApisConfig, section, "agent_apis")
    if cfg.responses_max_stored < 1:
        raise ConfigError("agent_apis.responses_max_stored must be an integer >= 1")
    if cfg.responses_max_age_s <= 0:
        raise ConfigError("agent_apis.responses_max_age_s must be a number > 0")
    return cfg


def resolve_model(cfg: AgentApisConfig, served: str, requested: str | None) -> str:
    """The served model for a requested name: itself, or an alias of it; anything else is a 404."""
    if requested is None or requested == served:
        return served
    for pattern, target in cfg.model_aliases.items():
        if fnmatch.fnmatchcase(requested, pattern) and (target is None or target == served):
            return served
    raise model_not_found(requested)
