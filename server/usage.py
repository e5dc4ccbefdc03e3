"""Usage ledger: one row per generation request (served locally, overflowed, aborted or rejected) in
SQLite, with tokens, latency, backend and cost estimates from a price table.

Where rows come from: RequestObserver (server/metrics.py) calls UsageRecorder.record() once in its
`finally`, the one place every HTTP request passes through, with the request's record the routes filled
in (server/request_record.py). The recorder builds the row and hands it to the ledger's queue; one writer thread commits rows in
small batches (WAL mode, synchronous=FULL: a committed row survives a crash). close() flushes.

Cost of a row (all $ estimates):
- holysheep: prompt x input price + completion x output price of the model on HolySheep;
- local: GPU-seconds x usage.gpu_hour_usd / 3600, where GPU-seconds = latency x devices / concurrency,
  devices = tensor x pipeline x data parallel size, concurrency = requests running at admission + 1
  (a request shares the deployment with those running beside it; None when gpu_hour_usd is unset);
- official_usd / holysheep_usd: what the same tokens cost on the official API / on HolySheep (None
  when the price table has no such price for the model).
The report (server/usage_report.py) sums these columns."""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request

from server.api_keys import ANONYMOUS_KEY
from server.config_schema import ConfigError, build_section
from server.request_record import RequestRecord, request_record
from server.usage_schema import open_state_db

if TYPE_CHECKING:
    from server.config import Config

log = logging.getLogger("glm_serve.usage")
METERED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"})
BACKENDS = ("local", "holysheep")
PRICE_BACKENDS = ("holysheep", "official")


@dataclass(frozen=True, slots=True)
class Price:
    input: float  # $ per million prompt tokens
    output: float  # $ per million completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


# HolySheep's published prices, as of PRICES_AS_OF; update here or override per model in the profile's
# usage.prices. Where HolySheep publishes one per-model average against the official API (not input and
# output), that average is applied to input and output alike. DeepSeek V3.2 has both: HolySheep's
# input/output list price, and an average equal to the official $0.42.
PRICES_AS_OF = "2026"
DEFAULT_PRICES: dict[str, dict[str, Price]] = {
    "glm-5": {"holysheep": Price(0.35, 1.40)},
    "deepseek-v3.2": {"holysheep": Price(0.27, 1.08), "official": Price(0.42, 0.42)},
    "gpt-4.1": {"holysheep": Price(1.20, 1.20), "official": Price(8.00, 8.00)},
    "claude-sonnet-4.5": {"holysheep": Price(2.25, 2.25), "official": Price(15.00, 15.00)},
    "gemini-2.5-flash": {"holysheep": Price(0.38, 0.38), "official": Price(2.50, 2.50)},
}


def canonical_model(name: str) -> str:
    """Price-table key: GLM-5, glm_5 and glm-5 are one model."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


@dataclass(frozen=True, slots=True)
class UsageConfig:
    """The usage ledger: one row per completion request, with tokens, latency and cost."""

    enabled: bool = True  # write the ledger
    path: str = "usage.sqlite"  # relative: under the state directory (state_dir())
    batch_size: int = 64  # rows per commit at most
    gpu_hour_usd: float | None = None  # the deployment's $ per device-hour; None: local cost not estimated
    prices_as_of: str = PRICES_AS_OF  # when the price table was checked
    # model -> {holysheep|official: {input, output}} in $ per million tokens, merged over DEFAULT_PRICES
    prices: dict[str, dict[str, Price]] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def price(self, backend: str, *models: str | None) -> Price | None:
        for model in models:
            if model:
                found = self.prices.get(canonical_model(model), {}).get(backend)
                if found is not None:
                    return found
        return None

    def resolved_path(self) -> Path:
        path = Path(self.path).expanduser()
        return path if path.is_absolute() else state_dir() / path


def state_dir() -> Path:
    """$GLM_SERVE_STATE_DIR, else $XDG_STATE_HOME/glm-serve, else ~/.local/state/glm-serve."""
    if os.environ.get("GLM_SERVE_STATE_DIR"):
        return Path(os.environ["GLM_SERVE_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "glm-serve"


def _check_keys(values: dict[str, Any], known: set[str], where: str) -> None:
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{where}.{key}' (known: {', '.join(sorted(known))})")


def _parse_prices(section: Any) -> dict[str, dict[str, Price]]:
    prices = {model: dict(by_backend) for model, by_backend in DEFAULT_PRICES.items()}
    if not isinstance(section or {}, dict):
        raise ConfigError("usage.prices must map model -> {holysheep|official: {input, output}}")
    for model, by_backend in (section or {}).items():
        where = f"usage.prices.{model}"
        if not isinstance(by_backend, dict):
            raise ConfigError(f"{where} must map holysheep|official to {{input, output}}")
        _check_keys(by_backend, set(PRICE_BACKENDS), where)
        for backend, price in by_backend.items():
            if not isinstance(price, dict) or set(price) != {"input", "output"}:
                raise ConfigError(f"{where}.{backend} must be {{input: $/MTok, output: $/MTok}}")
            if not all(isinstance(v, int | float) and v >= 0 for v in price.values()):
                raise ConfigError(f"{where}.{backend}: prices must be numbers >= 0")
            prices.setdefault(canonical_model(str(model)), {})[backend] = Price(
                float(price["input"]), float(price["output"])
            )
    return prices


def parse_usage_config(section: dict[str, Any] | None) -> UsageConfig:
    """The `usage:` section of a profile, checked; prices merge over DEFAULT_PRICES."""
    values = dict(section) if isinstance(section, dict) else section
    prices = _parse_prices(values.pop("prices", None) if isinstance(values, dict) else None)
    cfg: UsageConfig = replace(build_section(UsageConfig, values, "usage"), prices=prices)
    if cfg.batch_size < 1:
        raise ConfigError("usage.batch_size must be >= 1")
    if cfg.gpu_hour_usd is not None and cfg.gpu_hour_usd < 0:
        raise ConfigError("usage.gpu_hour_usd must be a number >= 0 (or null)")
    return cfg


# -- rows and the ledger ----------------------------------------------------------------------------------
@dataclass(slots=True)
class UsageRow:
    ts: float  # unix time at arrival
    request_id: str
    key_id: str  # sha256 of the API key (16 hex digits), or "anonymous"
    model: str  # the model id the client used (the served name)
    backend: str  # local | holysheep
    endpoint: str
    status: int  # HTTP status (499: the client left before its response)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_exact: bool = True  # False: estimated (an overflowed request the client abandoned)
    finish_reason: str | None = None  # comma-joined finish reasons of the choices
    stream: bool = False
    upstream_model: str | None = None
    overflow_reason: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    gpu_seconds: float | None = None
    cost_usd: float | None = None  # on the backend that served it
    official_usd: float | None = None
    holysheep_usd: float | None = None
    api: str | None = None  # chat | completions | messages | responses (schema version 2)


COLUMNS = [f.name for f in fields(UsageRow)]
INSERT = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_STOP = object()


class UsageLedger:
    """SQLite writer off the request path: submit() queues a row; one thread commits batches."""

    def __init__(self, path: Path, batch_size: int = 64) -> None:
        self.path = path
        self.batch_size = batch_size
        self._db = open_state_db(path, "usage ledger")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
            self._thread.start()

    def submit(self, row: UsageRow) -> None:
        if self._closed:  # a straggler after shutdown: written at once, not lost
            with closing(open_state_db(self.path, "usage ledger")) as db, db:
                db.execute(INSERT, _values(row))
            return
        self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is committed."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(30)
        else:
            self._drain_now()
        self._db.close()

    def _drain_now(self) -> None:
        pending: list[Any] = []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        self._write([p for p in pending if isinstance(p, UsageRow)])

    def _run(self) -> None:
        while True:
            pending = [self._queue.get()]
            while len(pending) < self.batch_size:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write([p for p in pending if isinstance(p, UsageRow)])
            for item in pending:
                if isinstance(item, threading.Event):
                    item.set()
            if any(item is _STOP for item in pending):
                self._drain_now()
                return

    def _write(self, rows: list[UsageRow]) -> None:
        if not rows:
            return
        for attempt in range(3):
            try:
                with self._db:
                    self._db.executemany(INSERT, [_values(r) for r in rows])
                return
            except sqlite3.Error:
                log.exception("usage ledger: writing %d rows failed (attempt %d)", len(rows), attempt + 1)
                time.sleep(0.1 * (attempt + 1))
        for row in rows:  # kept in the log rather than dropped silently
            log.error("usage row not written: %s", asdict(row))


def _values(row: UsageRow) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in COLUMNS)


# -- rows from the records of requests --------------------------------------------------------------------
def usage_api(name: str) -> Any:
    """Route dependency naming the API a request came through (its row's `api`: chat | completions |
    messages | responses). Route dependencies run before the body is validated: a 400 is named too."""

    def name_api(request: Request) -> None:
        request_record(request.scope).api = name

    return Depends(name_api)


class UsageRecorder:
    """Turns one finished HTTP request (its record) into one ledger row."""

    def __init__(self, cfg: UsageConfig, ledger: UsageLedger, devices: int) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.devices = devices

    @classmethod
    def from_config(cls, config: Config) -> UsageRecorder | None:
        cfg = parse_usage_config(config.extra.get("usage"))
        if not cfg.enabled:
            return None
        e = config.engine
        devices = e.tensor_parallel_size * e.pipeline_parallel_size * e.data_parallel_size
        return cls(cfg, UsageLedger(cfg.resolved_path(), cfg.batch_size), devices)

    def record(
        self, scope: dict[str, Any], status: int, started_at: float, latency_s: float, record: RequestRecord
    ) -> None:
        if scope.get("path") not in METERED_PATHS or scope.get("method") != "POST":
            return
        if status == 401:  # unauthenticated: no row (anyone could fill the ledger); /metrics counts them in
            return  # glm_serve:http_requests_total{status="401"}
        key = (scope.get("state") or {}).get("api_key")
        key_id = key.key_id if key is not None else ANONYMOUS_KEY.key_id
        reasons = record.finish_reasons
        row = UsageRow(
            ts=started_at,
            request_id=record.request_id,
            key_id=key_id,
            model=record.model or "",
            backend=record.served_by or "local",
            endpoint=scope["path"],
            api=record.api,
            status=status,
            prompt_tokens=record.prompt_tokens or 0,
            completion_tokens=record.completion_tokens or 0,
            tokens_exact=record.tokens_exact is not False,
            finish_reason=",".join(reasons) if reasons else None,
            stream=bool(record.stream),
            upstream_model=record.upstream_model,
            overflow_reason=record.overflow_reason,
            ttft_s=record.ttft_s,
            latency_s=round(latency_s, 6),
        )
        self.price(row, running=record.running_at_admission or 0)
        self.ledger.submit(row)

    def price(self, row: UsageRow, running: int) -> None:
        models = (row.model, row.upstream_model)
        tokens = (row.prompt_tokens, row.completion_tokens)
        official, holysheep = self.cfg.price("official", *models), self.cfg.price("holysheep", *models)
        row.official_usd = official.cost(*tokens) if official else None
        row.holysheep_usd = holysheep.cost(*tokens) if holysheep else None
        if row.backend == "holysheep":
            row.cost_usd = row.holysheep_usd
        elif row.backend == "local" and sum(tokens) > 0:  # not a routing target upstream (server/routing.py)
            row.gpu_seconds = row.latency_s * self.devices / (running + 1)
            rate = self.cfg.gpu_hour_usd
            row.cost_usd = row.gpu_seconds / 3600 * rate if rate is not None else None

    def start(self) -> None:
        self.ledger.start()

    def close(self) -> None:
        self.ledger.close()
