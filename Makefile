# Two commands do everything on a fresh machine:
#   make serve   set up, build the offline demo model, serve it on http://127.0.0.1:8080
#   make test    set up and run every test (the same command CI runs)
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
CLIENTS_VENV ?= .venv-clients
LITSERVE_VENV ?= .venv-litserve
DEMO ?= demo-model
BIN := $(VENV)/bin

.PHONY: serve test test-fast test-vllm test-clients test-clients-vllm test-image image lint bench setup setup-vllm setup-clients setup-litserve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml plugins/lmi_hf/pyproject.toml plugins/lmi_trtllm/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch -e '.[mpi,test,otel]' -e plugins/lmi_hf -e plugins/lmi_trtllm
	touch $@

$(DEMO)/serving.properties: | $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/lmi demo-model $(DEMO)

serve: $(VENV)/.installed $(DEMO)/serving.properties
	$(BIN)/lmi serve --model-dir $(DEMO) $(ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not mpi and not vllm" $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_http.py $(ARGS)

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: scripts/setup-vllm.sh plugins/lmi_vllm/pyproject.toml
	bash scripts/setup-vllm.sh $(VLLM_VENV)
	touch $@

# The vLLM half of the backend parity suite, the hf-vs-vllm comparison, the vLLM half of the LoRA
# server, reasoning and agent API tests, DJL's custom formatters and the residency tests on vLLM run
# here (the venv has lmi-hf and peft).
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -o addopts="-p no:cacheprovider" \
		tests/lmi_vllm tests/test_backend_parity.py tests/test_structured_outputs.py tests/test_lora_server.py \
		tests/test_reasoning_server.py tests/test_agent_apis.py tests/test_djl_formatters.py \
		tests/test_residency.py tests/test_bench_smoke.py $(ARGS)

# LitServe, the baseline of benchmarks/bench_litserve.py, in a venv of its own (it pins fastapi).
setup-litserve: $(LITSERVE_VENV)/.installed

$(LITSERVE_VENV)/.installed:
	python3 -m venv $(LITSERVE_VENV)
	$(LITSERVE_VENV)/bin/pip install -q litserve==0.2.19
	touch $@

setup-clients: $(CLIENTS_VENV)/.installed

$(CLIENTS_VENV)/.installed: scripts/setup-clients.sh constraints.txt
	bash scripts/setup-clients.sh $(CLIENTS_VENV)
	touch $@

# Real clients (lm-eval, guidellm, litellm, langchain-openai; vLLM's bench client, run from the vLLM
# venv) against lmi-core on the HF backend.
test-clients: $(VENV)/.installed $(CLIENTS_VENV)/.installed $(VLLM_VENV)/.installed
	LMI_CLIENTS_VENV=$(abspath $(CLIENTS_VENV)) LMI_VLLM_VENV=$(abspath $(VLLM_VENV)) \
		$(BIN)/python -m pytest -q -m "clients and not vllm" -o addopts="-p no:cacheprovider" \
		tests/clients $(ARGS)

# The same clients against lmi-core on the vLLM backend (the server runs from the vLLM venv).
test-clients-vllm: $(CLIENTS_VENV)/.installed $(VLLM_VENV)/.installed
	LMI_CLIENTS_VENV=$(abspath $(CLIENTS_VENV)) LMI_VLLM_VENV=$(abspath $(VLLM_VENV)) \
		$(VLLM_VENV)/bin/python -m pytest -q -m "clients and vllm" -o addopts="-p no:cacheprovider" \
		tests/clients $(ARGS)

# The container image (Dockerfile) with buildah, no daemon: FLAVOUR=cpu (default) or cuda, BASE=...
FLAVOUR ?= cpu
image:
	bash scripts/build-image.sh $(FLAVOUR)

# Build the CPU image and smoke-test it: tini, non-root, the demo model, /health, a drain on SIGTERM.
test-image: image
	bash scripts/image-smoke.sh localhost/lmi-core:0.1.0-$(FLAVOUR)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(CLIENTS_VENV) $(DEMO)
