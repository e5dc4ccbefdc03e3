"""The documentation in docs/ and the README against the code: every Prometheus series registered in
server/metrics.py is in docs/metrics.md (and nothing there is invented), every request field the API
models declare has a row in docs/api.md, every repository path the docs name exists, the README links
only documents in the repository, and the licence is Apache-2.0 in LICENSE and pyproject."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from server.engine_api import Load
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SERIES = re.compile(r"`((?:vllm|glm_serve):\w+)`")  # the first cell of a row of the series table
DOCUMENTS = ["README.md", "docs/architecture.md", "docs/api.md", "docs/metrics.md", "docs/troubleshooting.md"]


class _Engine:
    def load(self) -> Load:
        return Load(num_running=1, num_waiting=2, kv_usage=0.5, est_wait_s=0.0, gen_tokens_per_s=0.0)

    def stats(self) -> dict[str, float]:
        return {"prompt_tokens_total": 1.0, "generation_tokens_total": 2.0, "num_preemptions_total": 0.0}


def exported_series() -> set[str]:
    """Every series /metrics serves, with an engine bound (its gauges and counters appear only then);
    counters under their sample name (_total), as the docs and dashboards name them."""
    metrics = ServerMetrics()
    metrics.bind(_Engine(), "glm-5")  # type: ignore[arg-type]
    return {f.name + ("_total" if f.type == "counter" else "") for f in metrics.registry.collect()}


def test_every_metric_is_documented_and_every_documented_metric_exists():
    rows = [line for line in (DOCS / "metrics.md").read_text().splitlines() if line.startswith("| `")]
    documented = {SERIES.match(row[2:]).group(1) for row in rows if SERIES.match(row[2:])}
    exported = exported_series()
    assert len(exported) >= 16
    assert exported - documented == set(), "series missing from docs/metrics.md"
    assert documented - exported == set(), "docs/metrics.md lists series that server/metrics.py lacks"


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest], ids=lambda m: m.__name__)
def test_every_request_field_has_a_row_in_the_api_table(model):
    rows = (DOCS / "api.md").read_text()
    named = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", rows, re.M))
    documented = {name for pair in named for name in pair if name}
    missing = set(model.model_fields) - documented
    assert not missing, f"docs/api.md has no row for {sorted(missing)}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_paths_named_in_the_docs_exist(document: str):
    text = (ROOT / document).read_text()
    paths = {
        p.split(":")[0]
        for p in re.findall(r"`((?:server|backends|kernels|tests|deploy|configs|docs)/[\w./*<>-]*)", text)
    }
    assert paths
    paths = {p for p in paths if "<" not in p}  # placeholders: tests/test_models_<type>.py
    missing = sorted(p for p in paths if not list(ROOT.glob(p)))
    assert not missing, f"{document} names paths that do not exist: {missing}"


def test_the_readme_links_only_documents_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme and "DESIGN.md" not in readme
    for document in DOCUMENTS[1:]:
        assert f"`{document}`" in readme, f"the README does not point at {document}"


def test_the_licence_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert (
        "Apache License" in text
        and "Version 2.0, January 2004" in text
        and "END OF TERMS AND CONDITIONS" in text
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_the_validation_table_names_every_path_and_claims_no_accelerator_run():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Validation status", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line
    ]
    by_path = {cells[0].strip(): cells[1].strip() for cells in rows[1:]}
    assert by_path == {
        "CPU, native engine": "yes",
        "vLLM on CPU": "yes",
        "vLLM on NVIDIA": "no",
        "native on NVIDIA, Triton kernels": "no",
        "vllm-ascend": "no",
        "torch_npu, native engine": "no",
        "torch_mlu, native engine": "no",
        "multi-node on Ray (vLLM)": "no",
    }
    for cells in rows[1:]:
        for test in re.findall(r"`(test_\w+(?:\*)?\.py)`", cells[3]):
            assert list((ROOT / "tests").glob(test)), f"the validation table names a missing test file {test}"
