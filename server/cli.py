"""`glm-serve serve`: load a profile, apply the flags, build the engine, serve it with uvicorn.

SIGTERM (or Ctrl-C) drains: new requests get 503 and /health turns 503 while in-flight requests finish,
for at most server.drain_timeout_s; then uvicorn stops, the engine shuts down, and the process exits 0.
A second signal stops at once."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn

from server.app import count_connections, create_app, uvicorn_limits
from server.cli_flags import (
    add_config_flags,
    bind_unknown_values,
    config_from_args,
    expand_dotted,
    remember_flag_names,
)
from server.config import Config, ConfigError, effective_config
from server.engine_api import Engine
from server.logs import LOG_FORMATS, configure_logging
from server.routes.deps import ServingState
from server.tracing import setup_tracing

log = logging.getLogger("glm_serve.cli")
SHUTDOWN_GRACE_S = 2.0  # after the drain: how long uvicorn waits for connections before cancelling them


def build_engine(cfg: Config, factory: str | None = None) -> Engine:
    """The engine for a profile. `factory` ("module:callable", called with the EngineConfig) replaces
    the backend: the HTTP tests use it to serve a test double from a real `glm-serve serve` process."""
    if factory:
        module_name, _, attr = factory.partition(":")
        return getattr(importlib.import_module(module_name), attr)(cfg.engine)
    if cfg.engine.backend == "native":
        from server.engine import NativeEngine

        return NativeEngine(cfg.engine)
    if cfg.engine.backend == "vllm":
        from backends.vllm_engine import VllmEngine

        names = cfg.server.served_model_name and [
            cfg.server.served_model_name,
            *cfg.server.served_model_aliases,
        ]
        return VllmEngine(
            cfg.engine,
            passthrough=cfg.extra.get("vllm", {}),
            served_names=names or None,
            reasoning_parser=cfg.server.reasoning_parser,
        )
    raise ConfigError(f"unknown engine backend {cfg.engine.backend!r}")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase before its own shutdown and exit status 0 after a signal."""

    def __init__(self, config: uvicorn.Config, serving: ServingState) -> None:
        super().__init__(config)
        self.serving = serving
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None and not self.should_exit:
            timeout = self.serving.config.server.drain_timeout_s
            log.info("signal %d: draining (%d in flight, up to %.0f s)", sig, self.serving.in_flight, timeout)
            self.serving.draining = True
            self.drain_deadline = time.monotonic() + timeout
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True  # a second signal ends the drain

    async def on_tick(self, counter: int) -> bool:
        exiting = await super().on_tick(counter)
        if not exiting and self.drain_deadline is not None:
            exiting = self.serving.in_flight == 0 or time.monotonic() >= self.drain_deadline
        if exiting and self.serving.in_flight:
            log.warning("drain over: aborting %d requests still in flight", self.serving.in_flight)
            await self.serving.abort_in_flight()  # their responses end cleanly before uvicorn stops
        return exiting

    def fail(self, exc: BaseException) -> None:
        self.exit_code = 1
        self.should_exit = True


def serve(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    holder: dict[str, DrainingServer] = {}
    try:
        cfg = config_from_args(args, extra)
        log.info("configuration (key = value  [source]):\n%s", format_config(cfg, only_set=True))
        setup_tracing()
        if not fits_before_loading(cfg):
            return 2
        app = create_app(
            cfg,
            lambda: build_engine(cfg, args.engine_factory),
            on_engine_failure=lambda exc: holder["server"].fail(exc),
        )
    except ConfigError as exc:
        print(f"glm-serve: {exc}", file=sys.stderr)
        return 2
    uv_config = uvicorn.Config(
        app, host=cfg.server.host, port=cfg.server.port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, timeout_keep_alive=30, **uvicorn_limits(cfg.server),
    )  # fmt: skip
    server = holder["server"] = DrainingServer(uv_config, app.state.serving)
    count_connections(app.state.serving, server)
    server.run()
    return server.exit_code


def fits_before_loading(cfg: Config) -> bool:
    """The planner's memory check, before anything is loaded: refuse a layout that cannot hold the model."""
    from backends.planner import check_fits

    try:
        result = check_fits(cfg, cfg.engine.model)
    except ValueError as exc:  # the planner cannot size this model or device: say so, let the engine try
        log.warning("memory plan skipped: %s", exc)
        return True
    if not result.fits:
        print(f"glm-serve: the model does not fit this profile: {result.reason}", file=sys.stderr)
    return bool(result.fits)


# Subcommands whose own modules parse their arguments (their --help is theirs).
DELEGATED = {
    "plan": ("backends.planner", "memory plan: weights and KV per device for a profile and model"),
    "bench": ("benchmarks.serve_bench", "serving benchmark: load generator, suites, baselines"),
    "usage": ("server.usage_report", "usage ledger report: tokens, overflow share, cost comparison"),
    "routing": ("server.routing_report", "shadow/canary routing: comparison report, set a weight"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-serve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve a model behind the OpenAI-compatible API")
    add_config_flags(serve_cmd)
    remember_flag_names(serve_cmd)
    serve_cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve_cmd.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="text lines, or one JSON object per line"
    )
    serve_cmd.add_argument("--engine-factory", help=argparse.SUPPRESS)  # tests: "module:callable"
    serve_cmd.set_defaults(func=serve)
    config_cmd = commands.add_parser("config", help="the effective configuration, with each key's source")
    config_cmd.add_argument("action", choices=["show"])
    config_cmd.add_argument("--json", action="store_true", help="print JSON: {key: {value, source}}")
    add_config_flags(config_cmd)
    remember_flag_names(config_cmd)
    config_cmd.set_defaults(func=show_config)
    tiny_cmd = commands.add_parser("tiny-glm5", help="write a tiny random GLM-5-architecture checkpoint")
    tiny_cmd.add_argument("out_dir", help="directory to write (created if missing)")
    tiny_cmd.add_argument("--seed", type=int, default=0)
    tiny_cmd.set_defaults(func=write_tiny_glm5)
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def show_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    try:
        cfg = config_from_args(args, extra)
    except ConfigError as exc:
        print(f"glm-serve: {exc}", file=sys.stderr)
        return 2
    if args.json:
        rows = {key: {"value": value, "source": source} for key, value, source in effective_config(cfg)}
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_config(cfg))
    return 0


def format_config(cfg: Config, only_set: bool = False) -> str:
    """One line per key: `key = value  [source]`; only_set: the keys not at their defaults' source."""
    rows = [r for r in effective_config(cfg) if not only_set or r[2] != "default"]
    width = max((len(key) for key, _, _ in rows), default=0)
    return "\n".join(
        f"  {key:<{width}} = {json.dumps(value, default=str)}  [{source}]" for key, value, source in rows
    )


def write_tiny_glm5(args: argparse.Namespace) -> int:
    from backends.models.tiny import main as tiny_main

    return tiny_main([args.out_dir, "--seed", str(args.seed)])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        configure_logging("info")
        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]))
    args, extra = parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    if args.command in ("serve", "config"):
        return int(args.func(args, extra))
    return int(args.func(args))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The subcommand's arguments, and (serve, config) the leftover vLLM engine-arg flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(bind_unknown_values(expand_dotted(argv), _option_strings(parser)))
    if extra and args.command not in ("serve", "config"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    subparsers = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    return {s for sub in subparsers.values() for a in sub._actions for s in a.option_strings}


if __name__ == "__main__":
    sys.exit(main())
