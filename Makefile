.DEFAULT_GOAL := help
VENV ?= .venv

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

test: ## Install everything the tests need, then run the whole suite
	bash scripts/test.sh

develop: ## Build the extension in place into $(VENV) (release)
	$(VENV)/bin/maturin develop --release

lint: ## cargo fmt/clippy, ruff, mypy
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/mypy --strict python/storescp

bench: ## Throughput against dcmtk storescp, with the bounds of each round (benchmarks/README.md)
	$(VENV)/bin/python benchmarks/harness.py --bounds

.PHONY: help test develop lint bench
