# One-command entry points. Each target creates .venv and installs on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint lint-imports typecheck proto proto-check proto-lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from local disk first, so the package's looser range installs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,speech]"
	touch $(STAMP)

## Main job: the federated simulation on built-in data (owners train, coordinator fuses, table printed).
demo: $(STAMP)
	$(BIN)/jacfusion-fed simulate --quick

## Tests: lint, types, generated-code freshness, buf lint, then the default tests (neither slow
## nor e2e). pytest exits 5 when a marker selects no test: that is not a failure here.
test: $(STAMP) lint typecheck proto-check proto-lint
	$(BIN)/python -m pytest -q || test $$? -eq 5

## End-to-end tests with several processes (servers, Ray, SuperLink/SuperNodes): CI's second step.
.PHONY: test-e2e
test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m 'e2e and not slow' || test $$? -eq 5

## The container image and the compose deployment (tests/containers): build, up, flwr run,
## predict, check, down -v. Needs a Docker engine; as root, scripts/with-dockerd.sh starts one
## (CI: `scripts/with-dockerd.sh make test-containers`).
.PHONY: test-containers
test-containers: $(STAMP)
	$(BIN)/python -m pytest -q -s -m containers --timeout=3600 tests/containers

## README.md and the docs/ walkthroughs run as written, from a clean clone of HEAD, in a fresh
## network namespace when root (conventions: tests/readme_runner.py, docs/readme-runner.md).
.PHONY: test-readme
test-readme: $(STAMP)
	$(BIN)/python tests/readme_runner.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || test $$? -eq 5

lint: $(STAMP) lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# server/ and clients/ are installed as jacfusion_fed.server/.clients by package-dir, through an
# import hook of the editable install that neither the import graph nor mypy can follow (run on
# the folders, mypy would name them `server`/`clients` and read every jacfusion_fed.server
# import as Any). Both checks therefore run on a mirror of the installed layout, with the two
# folders inside jacfusion_fed/: MIRROR builds it in "$$tree" (copies keep their mtimes, so
# mypy's cache stays valid between runs).
MIRROR = mkdir -p "$$tree/jacfusion_fed" && cp -pR jacfusion_fed/. "$$tree/jacfusion_fed/" && \
	cp -pR server "$$tree/jacfusion_fed/server" && cp -pR clients "$$tree/jacfusion_fed/clients"
# Paths in the mirror's reports back to the repository's own.
UNMIRROR = sed -e 's\#^jacfusion_fed/server/\#server/\#' -e 's\#^jacfusion_fed/clients/\#clients/\#'

# Import contracts ([tool.importlinter] in pyproject.toml), on a temporary mirror.
lint-imports: $(STAMP)
	@tree=$$(mktemp -d) && trap 'rm -rf "$$tree"' EXIT && $(MIRROR) && \
	cd "$$tree" && PYTHONPATH="$$tree" "$(CURDIR)/$(BIN)/lint-imports" \
		"$(CURDIR)/pyproject.toml" --no-cache

# mypy --strict ([tool.mypy]) on the whole installed package jacfusion_fed, server/ and clients/
# included; the generated stubs (jacfusion_fed/rpc/jacfusion) are exempt there. The mirror sits
# at a fixed place so that the cache's paths match from one run to the next.
typecheck: $(STAMP)
	@tree=.mypy_cache/installed-tree && rm -rf "$$tree" && $(MIRROR) && \
	out=$$(cd "$$tree" && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" \
		--cache-dir "$(CURDIR)/.mypy_cache/installed" -p jacfusion_fed 2>&1); rc=$$?; \
	printf '%s\n' "$$out" | $(UNMIRROR); exit $$rc

proto: $(STAMP)
	$(BIN)/python -m jacfusion_fed.rpc.codegen

proto-check: $(STAMP)
	$(BIN)/python -m jacfusion_fed.rpc.codegen --check

# buf comes from the npm registry (@bufbuild/buf) into .tools/; without npm this says so and
# continues (tests/test_proto_codegen.py still checks Buf's naming rules without buf).
proto-lint: $(STAMP)
	@if command -v npm >/dev/null 2>&1; then \
		test -x .tools/node_modules/.bin/buf || $(BIN)/python -m jacfusion_fed.rpc.codegen --install-buf; \
		$(BIN)/python -m jacfusion_fed.rpc.codegen --lint; \
	else echo "npm not found: buf lint skipped (install Node.js/npm to run it)"; fi

bench: $(STAMP)
	$(BIN)/jacfusion-fed bench fusion

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
