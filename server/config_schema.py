"""The configuration schema and its sources.

Every section is a typed dataclass (engine and server in server/config.py, overflow and usage in their own
modules); pydantic validates each value against its field's type. A key is known by its dotted path
(`overflow.triggers.queue_waiting`), set in a profile (YAML), the environment
(`GLM_SERVE_OVERFLOW__TRIGGERS__QUEUE_WAITING`) or the command line (a flag or `--set`); the later source
wins. The `vllm` section holds vLLM engine arguments by vLLM's own names (server/vllm_args.py checks them).
Errors are one line that names the key, where its value came from and the type expected."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

ENV_PREFIX = "GLM_SERVE_"
DEFAULT = "default"
# section -> "module:dataclass"; the modules import server.config, so they are resolved on first use.
SECTION_TYPES = {
    "engine": "server.config:EngineConfig",
    "server": "server.config:ServerConfig",
    "overflow": "server.overflow:OverflowConfig",
    "usage": "server.usage:UsageConfig",
    "routing": "server.routing:RoutingConfig",
    "agent_apis": "server.agent_apis:AgentApisConfig",
}
FREEFORM_SECTIONS = ("vllm", "notes")  # vllm: vLLM's engine args (checked against vLLM); notes: comments
TOP_LEVEL_KEYS = {"profile": str, "description": str, "models": list[dict[str, Any]]}
SECRET_KEYS = ("server.api_keys", "server.sovereign_keys", "server.force_overflow_keys", "server.admin_keys")
_SECRET_WORDS = ("key", "token", "secret", "password")


class ConfigError(ValueError):
    """A configuration the server refuses; the message is one line naming the key and its source."""


@dataclass(frozen=True, slots=True)
class Key:
    """One settable leaf of the schema."""

    path: str  # dotted: section.name[.name]
    type: Any  # the field's resolved annotation
    default: Any
    doc: str  # the comment beside the field in its dataclass

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.path.upper().replace(".", "__")


def section_class(section: str) -> type:
    module, _, name = SECTION_TYPES[section].partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def schema() -> dict[str, Key]:
    """Every typed key, by dotted path, in declaration order."""
    keys: dict[str, Key] = {}
    for section in SECTION_TYPES:
        _collect(section_class(section), section, keys)
    return keys


def _collect(cls: type, prefix: str, out: dict[str, Key]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            _collect(hint, path, out)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[path] = Key(path, hint, default, docs.get(f.name, ""))


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: its trailing `# comment`, else the comment lines right above it."""
    import inspect

    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        name, colon, rest = text.partition(":")
        if colon and name.isidentifier():
            docs[name] = rest.split("#", 1)[1].strip() if "#" in rest else " ".join(above)
        above = []
    return docs


def type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint)).replace("NoneType", "None")


# -- reading the sources into one flat {path: (value, source)} map -----------------------------------------
Layer = dict[str, tuple[Any, str]]  # dotted path -> (value, where it came from)


def closest(name: str, known: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def unknown_key(path: str, source: str, known: typing.Iterable[str]) -> ConfigError:
    where = f" ({source})" if source else ""
    return ConfigError(f"unknown config key '{path}'{where}{closest(path, known)}")


def _section_of(path: str) -> str:
    return path.partition(".")[0]


def flatten_profile(data: dict[str, Any], source: str) -> Layer:
    """The profile's sections as leaves; unknown keys are errors with the closest known name."""
    keys = schema()
    layer: Layer = {}
    known_top = [*SECTION_TYPES, *FREEFORM_SECTIONS, *TOP_LEVEL_KEYS]
    for top, value in data.items():
        if top in TOP_LEVEL_KEYS:
            continue
        if top not in known_top:
            raise unknown_key(top, source, known_top)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(
                f"config section '{top}' ({source}) must be a mapping, not {type(value).__name__}"
            )
        if top in FREEFORM_SECTIONS:
            layer.update({f"{top}.{name}": (v, source) for name, v in value.items()})
        else:
            _flatten(value, top, keys, source, layer)
    return layer


def _flatten(mapping: dict[str, Any], prefix: str, keys: dict[str, Key], source: str, out: Layer) -> None:
    branches = {k.rsplit(".", 1)[0] for k in keys}
    for name, value in mapping.items():
        path = f"{prefix}.{name}"
        if path in keys:
            out[path] = (value, source)
        elif path in branches and isinstance(value, dict):
            _flatten(value, path, keys, source, out)
        elif path in branches:
            raise ConfigError(f"config key '{path}' ({source}) must be a mapping, not {value!r}")
        else:
            siblings = [k for k in {*keys, *branches} if k.startswith(prefix + ".")]
            raise unknown_key(path, source, siblings)


def env_layer(environ: dict[str, str]) -> Layer:
    """GLM_SERVE_<SECTION>__<KEY>[__<KEY>] variables; other GLM_SERVE_* names (no `__`) are not config."""
    layer: Layer = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            layer[path] = (raw, f"environment {name}")
    return layer


def check_known(layer: Layer) -> None:
    keys = schema()
    for path, (_, source) in layer.items():
        if path not in keys and _section_of(path) not in FREEFORM_SECTIONS:
            raise unknown_key(path, source, keys)
        if _section_of(path) in FREEFORM_SECTIONS and "." not in path:
            raise ConfigError(f"config key '{path}' ({source}) needs a name: {path}.<name>")


# -- typing the values -------------------------------------------------------------------------------------
@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint


def from_text(raw: str, hint: Any) -> Any:
    """A value typed as text (environment, --set) in the shape the field's type expects: `null` for None,
    a comma list or YAML flow list for lists, YAML (JSON) for mappings; scalars stay text for pydantic."""
    base = _base(hint)
    if _allows_none(hint) and raw.strip().lower() in ("", "null", "none"):
        return None
    origin = typing.get_origin(base) or base
    if origin in (list, tuple):
        return yaml.safe_load(raw) if raw.lstrip().startswith("[") else [s for s in raw.split(",") if s]
    if origin is dict:
        return yaml.safe_load(raw)
    return raw


def typed_value(path: str, value: Any, source: str) -> Any:
    """The value validated against its field's type; text sources are parsed first. vllm.* values from
    text are YAML scalars or JSON (vLLM's own types are checked by server/vllm_args.py)."""
    from_string = source != DEFAULT and not source.startswith("profile") and isinstance(value, str)
    if _section_of(path) in FREEFORM_SECTIONS:
        return yaml.safe_load(value) if from_string else value
    hint = schema()[path].type
    if from_string:
        value = from_text(value, hint)
    checked = checked_value(hint, value, path, source)
    return value if typing.get_origin(_base(hint)) is dict else checked


def build_section(cls: type, values: Any, where: str, source: str = "") -> Any:
    """A section's dataclass from its mapping (None: the defaults): an unknown key is an error naming the
    closest known one, each value is checked against its field's type, and nested dataclasses and maps
    of names to dataclasses (routing.targets) are built the same way, so every error names the full key."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{where}' must be a mapping, not {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f"{where}.{f.name}" for f in dataclasses.fields(cls)]
    built = {}
    for name, value in values.items():
        if name not in hints:
            raise unknown_key(f"{where}.{name}", source, known)
        built[name] = checked_value(hints[name], value, f"{where}.{name}", source)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in built:
            raise ConfigError(f"config key '{where}.{f.name}'{f' ({source})' if source else ''} is required")
    return cls(**built)


def checked_value(hint: Any, value: Any, path: str, source: str = "") -> Any:
    """`value` validated against the field type `hint` (dataclasses built by build_section)."""
    item = _dataclass_values(hint)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, path, source)  # type: ignore[arg-type]
    if item is not None and isinstance(value, dict):
        return {str(name): build_section(item, v, f"{path}.{name}", source) for name, v in value.items()}
    try:
        return _adapter(hint).validate_python(value)
    except ValidationError as exc:
        why = exc.errors()[0]["msg"]
        where = f" ({source})" if source else ""
        raise ConfigError(
            f"config key '{path}' = {value!r}{where}: expected {type_name(hint)} ({why})"
        ) from None


def _dataclass_values(hint: Any) -> type | None:
    """D for a dict[str, D] of dataclass D (a map of names to sections), else None."""
    args = typing.get_args(_base(hint))
    if typing.get_origin(_base(hint)) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """Later layers win. Returns the typed values and the source of each, by dotted path."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        check_known(layer)
        for path, (value, source) in layer.items():
            values[path] = typed_value(path, value, source)
            sources[path] = source
    return values, sources


def nest(values: dict[str, Any], section: str) -> dict[str, Any]:
    """The section's dotted values as nested mappings (the shape the dataclasses and parsers take)."""
    out: dict[str, Any] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if head != section:
            continue
        *branches, leaf = rest.split(".")
        node = out
        for branch in branches:
            node = node.setdefault(branch, {})
        node[leaf] = value
    return out


def redacted(path: str, value: Any) -> Any:
    """What `config show` and the start-up log print for a value: secrets as a count, never the text."""
    secret = path in SECRET_KEYS or (
        _section_of(path) in FREEFORM_SECTIONS and any(w in path.rsplit(".", 1)[-1] for w in _SECRET_WORDS)
    )
    if not secret or value in (None, [], ""):
        return value
    return f"<{len(value)} redacted>" if isinstance(value, list) else "<redacted>"
