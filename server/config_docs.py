"""docs/configuration.md from the schema: every key with its type, default, meaning and environment name.

python -m server.config_docs          # rewrite docs/configuration.md
python -m server.config_docs --check  # exit 1 when the committed file is stale (tests do this)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.config_schema import ENV_PREFIX, SECTION_TYPES, Key, schema, section_class, type_name

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
INTRO = f"""# Configuration reference

Generated from the schema (server/config.py and the sections' own modules) by `python -m server.config_docs`;
tests fail when this file is stale. Do not edit it by hand.

A value comes from, latest winning: the field's default < the profile (`--config NAME|PATH`, YAML) <
the environment (`{ENV_PREFIX}<SECTION>__<KEY>`, nested keys joined by `__`) < the command line
(a flag of `glm-serve serve`, or `--set section.key=value` for any key). `glm-serve config show` prints
every key's value and where it came from (secrets redacted); the server logs the keys that are not
defaults at start. Environment and `--set` values are text: booleans are true/false/1/0/yes/no/on/off,
`null` unsets an optional key, lists are comma-separated (or `[a, b]`), mappings are JSON. A wrong type,
an unknown key (with the closest valid name) or a bad value is a one-line error naming the key and its
source; `glm-serve serve` then exits with status 2.

## vllm

vLLM engine arguments by vLLM's own names (the fields of `vllm.engine.arg_utils.EngineArgs`), passed to
the engine unchanged when `engine.backend` is `vllm` (an error with the native backend), e.g.
`speculative_config: {{method: mtp, num_speculative_tokens: 3}}`. Names are checked against vLLM's
EngineArgs where vLLM is installed; the arguments the engine section owns (`tensor_parallel_size`,
`max_model_len`, `gpu_memory_utilization` = `engine.memory_fraction`, ...) are set there instead.
Environment: `{ENV_PREFIX}VLLM__<NAME>` (the value as YAML/JSON); command line: `--set vllm.NAME=VALUE`,
or any `--engine-arg-name VALUE` flag of `vllm serve` that glm-serve has no flag for.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(key: Key) -> str:
    value = key.default
    if isinstance(value, dict) and len(json.dumps(value, default=str)) > 60:
        return f"{len(value)} entries (see the module)"
    return f"`{json.dumps(value, default=str)}`"


def render() -> str:
    out = [INTRO]
    keys = schema()
    for section in SECTION_TYPES:
        cls = section_class(section)
        doc = (cls.__doc__ or "").strip()
        explained = doc and not doc.startswith(f"{cls.__name__}(")  # not dataclass's generated signature
        out += [f"## {section}", "", doc.splitlines()[0] if explained else "", ""]
        out += ["| key | type | default | meaning | environment |", "|---|---|---|---|---|"]
        for key in (k for path, k in keys.items() if path.startswith(section + ".")):
            out.append(
                f"| `{key.path}` | `{_cell(type_name(key.type))}` | {_cell(_default(key))} | "
                f"{_cell(key.doc) or '-'} | `{key.env}` |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is stale: run python -m server.config_docs", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(exist_ok=True)
    DOC_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
