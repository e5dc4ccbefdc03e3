"""The typed configuration: every section from YAML, environment and command line, precedence, and
one-line errors that name the key, its source and the expected type (issue 18 item 1, issue 13)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.cli import main
from server.config import ConfigError, effective_config, load_config
from server.config_docs import DOC_PATH, render
from server.config_schema import schema

# (environment variable, raw text, dotted key, typed value): every section, nested keys included.
ENV_CASES = [
    ("GLM_SERVE_ENGINE__MAX_NUM_SEQS", "8", "engine.max_num_seqs", 8),
    ("GLM_SERVE_ENGINE__ENABLE_PREFIX_CACHING", "off", "engine.enable_prefix_caching", False),
    ("GLM_SERVE_ENGINE__MAX_MODEL_LEN", "null", "engine.max_model_len", None),
    ("GLM_SERVE_SERVER__PORT", "8123", "server.port", 8123),
    ("GLM_SERVE_SERVER__API_KEYS", "sk-a,sk-b", "server.api_keys", ["sk-a", "sk-b"]),
    ("GLM_SERVE_SERVER__DRAIN_TIMEOUT_S", "2.5", "server.drain_timeout_s", 2.5),
    ("GLM_SERVE_OVERFLOW__ENABLED", "true", "overflow.enabled", True),
    ("GLM_SERVE_OVERFLOW__TRIGGERS__QUEUE_WAITING", "5", "overflow.triggers.queue_waiting", 5),
    ("GLM_SERVE_OVERFLOW__MODELS", '{"glm-5": "glm_5"}', "overflow.models", {"glm-5": "glm_5"}),
    ("GLM_SERVE_USAGE__BATCH_SIZE", "16", "usage.batch_size", 16),
    ("GLM_SERVE_USAGE__GPU_HOUR_USD", "2.5", "usage.gpu_hour_usd", 2.5),
]


def _value(cfg, dotted: str):
    section, *path = dotted.split(".")
    node = {"engine": cfg.engine, "server": cfg.server}.get(section) or cfg.extra[section]
    for name in path:
        node = node[name] if isinstance(node, dict) else getattr(node, name)
    return node


@pytest.mark.parametrize(("env", "raw", "key", "expected"), ENV_CASES)
def test_every_section_from_the_environment(env, raw, key, expected):
    cfg = load_config("cpu", environ={env: raw})
    assert _value(cfg, key) == expected
    assert cfg.sources[key] == f"environment {env}"


YAML_CASES = [
    ("engine:\n  max_num_seqs: 4\n", "engine.max_num_seqs", 4),
    ("server:\n  port: 9001\n", "server.port", 9001),
    ("overflow:\n  enabled: true\n  triggers: {kv_usage: 0.5}\n", "overflow.triggers.kv_usage", 0.5),
    ("usage:\n  enabled: false\n", "usage.enabled", False),
    ("engine:\n  backend: vllm\nvllm:\n  swap_space: 8\n", "vllm.swap_space", 8),
]


@pytest.mark.parametrize(("text", "key", "expected"), YAML_CASES)
def test_every_section_from_a_profile(tmp_path, text, key, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    cfg = load_config(path, environ={})
    assert _value(cfg, key) == expected
    assert cfg.sources[key] == f"profile {path}"


def test_precedence_flag_over_env_over_profile_over_default():
    profile = load_config("cpu", environ={})
    assert profile.engine.max_model_len == 8192 and profile.sources["engine.max_model_len"].startswith(
        "profile"
    )
    assert "engine.seed" not in profile.sources  # a default
    env = {"GLM_SERVE_ENGINE__MAX_MODEL_LEN": "4096"}
    assert load_config("cpu", environ=env).engine.max_model_len == 4096
    flagged = load_config(
        "cpu",
        {"engine.max_model_len": 2048},
        environ=env,
        override_sources={"engine.max_model_len": "--max-model-len"},
    )
    assert (
        flagged.engine.max_model_len == 2048 and flagged.sources["engine.max_model_len"] == "--max-model-len"
    )


# (how it is given, what the one-line error must say)
ERROR_CASES = [
    (
        {"env": {"GLM_SERVE_OVERFLOW__ENABLED": "flase"}},
        r"'overflow.enabled' = 'flase' \(environment GLM_SERVE_OVERFLOW__ENABLED\): expected bool",
    ),
    (
        {"env": {"GLM_SERVE_ENGINE__ENABLE_PREFIX_CACHING": "flase"}},
        r"'engine.enable_prefix_caching'.*expected bool",
    ),
    (
        {"env": {"GLM_SERVE_SERVER__PORT": "eighty"}},
        r"'server.port' = 'eighty' \(environment GLM_SERVE_SERVER__PORT\): expected int",
    ),
    (
        {"env": {"GLM_SERVE_ENGINE__MAX_NUM_SEQ": "8"}},
        r"unknown config key 'engine.max_num_seq' .*did you mean 'engine.max_num_seqs'",
    ),
    (
        {"env": {"GLM_SERVE_OVERFLOW__TRIGGER__KV_USAGE": "1"}},
        r"'overflow.trigger.kv_usage'.*did you mean 'overflow.triggers.kv_usage'",
    ),
    ({"yaml": "engine:\n  max_batch: 8\n"}, r"unknown config key 'engine.max_batch' \(profile .*\)"),
    ({"yaml": "servr:\n  port: 1\n"}, r"unknown config key 'servr'.*did you mean 'server'"),
    (
        {"yaml": "engine:\n  max_num_seqs: many\n"},
        r"'engine.max_num_seqs' = 'many' \(profile .*\): expected int",
    ),
    ({"yaml": "usage:\n  batch_size: [1]\n"}, r"'usage.batch_size'.*expected int"),
    ({"yaml": "overflow: 3\n"}, r"section 'overflow' .* must be a mapping"),
    ({"set": {"server.prot": "1"}}, r"unknown config key 'server.prot' \(--set server.prot\).*'server.port'"),
    (
        {"set": {"usage.enabled": "maybe"}},
        r"'usage.enabled' = 'maybe' \(--set usage.enabled\): expected bool",
    ),
    (
        {"set": {"vllm.speculative_config": "{method: eagle}"}},
        r"speculative_config \(--set vllm.speculative_config\).method must be one of ngram, mtp on the native",
    ),
    (
        {"set": {"engine.backend": "vllm", "vllm.max_model_len": "9"}},
        r"'vllm.max_model_len'.*set engine.max_model_len instead",
    ),
    (
        {"set": {"server.tool_call_parser": "hermes"}},
        r"server.tool_call_parser 'hermes' .*known: glm45, glm47",
    ),
]


@pytest.mark.parametrize(("given", "message"), ERROR_CASES)
def test_errors_name_key_source_and_type(tmp_path, given, message):
    path = None
    if "yaml" in given:
        path = tmp_path / "bad.yaml"
        path.write_text(given["yaml"])
    sets = given.get("set", {})
    with pytest.raises(ConfigError, match=message) as info:
        load_config(
            path or "cpu",
            dict(sets),
            environ=given.get("env", {}),
            override_sources={k: f"--set {k}" for k in sets},
        )
    assert "\n" not in str(info.value)


CLI_ERRORS = [
    (
        ["serve", "--set", "engine.max_num_seqs=abc"],
        {},
        "'engine.max_num_seqs' = 'abc' (--set engine.max_num_seqs): expected int",
    ),
    (
        ["serve"],
        {"GLM_SERVE_OVERFLOW__ENABLED": "flase"},
        "(environment GLM_SERVE_OVERFLOW__ENABLED): expected bool",
    ),
    (
        ["serve", "--speculative-config", '{"method": "ngram"}'],
        {},
        "num_speculative_tokens is required with method ngram",
    ),
    (["serve", "--reasoning-parser", "deepseek_r1"], {}, "known: glm45"),
    (["config", "show", "--set", "overflow.enabeld=true"], {}, "did you mean 'overflow.enabled'"),
]


@pytest.mark.parametrize(("argv", "env", "message"), CLI_ERRORS)
def test_cli_config_errors_exit_2_with_one_line(monkeypatch, capsys, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_config_show_prints_sources_and_redacts_secrets(monkeypatch, capsys):
    monkeypatch.setenv("GLM_SERVE_SERVER__API_KEYS", "sk-secret-one,sk-secret-two")
    assert main(["config", "show", "--config", "cpu", "-tp", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["server.api_keys"] == {
        "value": "<2 redacted>",
        "source": "environment GLM_SERVE_SERVER__API_KEYS",
    }
    assert shown["engine.tensor_parallel_size"]["source"] == "--tensor-parallel-size"
    assert shown["engine.backend"]["source"].startswith("profile ")
    assert shown["engine.seed"] == {"value": 0, "source": "default"}
    assert set(schema()) <= set(shown)
    assert main(["config", "show"]) == 0
    assert "sk-secret" not in capsys.readouterr().out


def test_effective_config_covers_every_key():
    rows = effective_config(load_config("nvidia-h200", environ={}))
    keys = [key for key, _, _ in rows]
    assert set(schema()) <= set(keys)
    assert ("vllm.speculative_config", {"method": "mtp", "num_speculative_tokens": 3}) in [
        (k, v) for k, v, _ in rows
    ]


def test_configuration_doc_is_generated_from_the_schema():
    """Stale docs/configuration.md: run `python -m server.config_docs`."""
    text = render()
    assert DOC_PATH.read_text() == text
    for key in schema().values():
        assert re.search(rf"\| `{re.escape(key.path)}` \|.*\| `{key.env}` \|", text), key.path


def test_every_key_is_documented():
    undocumented = [path for path, key in schema().items() if not key.doc]
    assert not undocumented, "add a `# comment` to these fields: " + ", ".join(undocumented)


def test_docs_command_check_mode(tmp_path, monkeypatch):
    from server import config_docs

    monkeypatch.setattr(config_docs, "DOC_PATH", tmp_path / "configuration.md")
    assert config_docs.main(["--check"]) == 1
    assert config_docs.main([]) == 0 and config_docs.main(["--check"]) == 0
    assert Path(config_docs.DOC_PATH).read_text().startswith("# Configuration reference")
