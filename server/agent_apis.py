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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from server.config import ConfigError
from server.errors import model_not_found
from server.usage import state_dir


@dataclass(frozen=True, slots=True)
class AgentApisConfig:
    model_aliases: dict[str, str | None] = field(default_factory=lambda: {"claude-*": None})
    responses_store: bool = True
    responses_max_stored: int = 10_000
    responses_max_age_s: float = 30 * 86400.0
    responses_path: str = "responses.sqlite"

    def resolved_path(self) -> Path:
        path = Path(self.responses_path).expanduser()
        return path if path.is_absolute() else state_dir() / path


def parse_agent_apis_config(section: dict[str, Any] | None) -> AgentApisConfig:
    if section is None:
        return AgentApisConfig()
    if not isinstance(section, dict):
        raise ConfigError("agent_apis must be a mapping")
    known = {f.name for f in fields(AgentApisConfig)}
    for key in section:
        if key not in known:
            raise ConfigError(f"unknown config key 'agent_apis.{key}' (known: {', '.join(sorted(known))})")
    cfg = AgentApisConfig(**section)
    aliases = cfg.model_aliases
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in aliases.items()
    ):
        raise ConfigError("agent_apis.model_aliases must map model-name patterns to a model name or null")
    if not isinstance(cfg.responses_store, bool):
        raise ConfigError("agent_apis.responses_store must be true or false")
    if not isinstance(cfg.responses_max_stored, int) or cfg.responses_max_stored < 1:
        raise ConfigError("agent_apis.responses_max_stored must be an integer >= 1")
    if not isinstance(cfg.responses_max_age_s, int | float) or cfg.responses_max_age_s <= 0:
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
