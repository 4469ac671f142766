# ultradino_lab developer commands. Install once:  python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: test export check-sync nbtest pytest clean-nbs docs bench-data readme

## test: export, fail if notebooks and library were out of sync or notebooks hold outputs, run notebook tests, then pytest
test: check-sync nbtest pytest

check-sync:
	python tools/check_sync.py

nbtest:
	nbdev-test --n-workers 2 --timing --skip-folder-re "^([_.]|pipelines$$)"

pytest:
	pytest -q tests

export:
	nbdev-export

clean-nbs:
	nbdev-clean

## docs: offline docs site (no Quarto needed) into _site/ (open _site/index.html); with Quarto: nbdev-docs
docs:
	python -c "from ultradino_lab.docsite import build_docs; build_docs()"

## bench-data: decode + sector crop + streamed statistics over the shared HC18 images (JSON in outputs/bench/)
bench-data:
	python tools/bench_data.py

## readme: regenerate README.md from nbs/index.ipynb (nbdev-readme needs Quarto)
readme:
	python -c "from ultradino_lab.docsite import write_readme; write_readme()"
