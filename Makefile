# The two commands of README.md. Everything they need is installed here, by
# deploy/install.sh (nginx from the system packages, the project into .venv).
VENV   := .venv
ENGINE := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
ARGS   ?=
IMAGE  ?= localhost/vgate:cpu

.PHONY: serve test lint bench soak install image clean dashboard-png

$(VENV)/.installed-$(ENGINE): pyproject.toml deploy/install.sh
	deploy/install.sh --venv $(VENV) --extras $(ENGINE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-$(ENGINE)
	deploy/install.sh --venv $(VENV) --extras $(ENGINE),test
	touch $@

install: $(VENV)/.installed-$(ENGINE)

serve: $(VENV)/.installed-$(ENGINE)
	exec $(VENV)/bin/vgate serve --log-format text $(ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# The CPU image the end-to-end image test runs (deploy/build-image.sh: debootstrap,
# podman, buildah; downloads kept in build/ and podman's store between builds).
image: $(VENV)/.installed-test
	deploy/build-image.sh $(IMAGE)

test: lint image
	VGATE_IMAGE=$(IMAGE) $(VENV)/bin/pytest -p no:cacheprovider --durations=25

# 30 minutes of load (VGATE_SOAK_S to change it): nothing fails, memory stays flat.
soak: $(VENV)/.installed-test
	$(VENV)/bin/pytest -p no:cacheprovider -s --timeout 7200 soak

bench: $(VENV)/.installed-test
	$(VENV)/bin/python -m benchmarks.run $(ARGS)

# README's picture of the dashboard: its panels drawn from a real Prometheus scraping a
# stack under load (the monitoring end-to-end test, which draws them anyway).
dashboard-png: $(VENV)/.installed-test
	VGATE_DASHBOARD_PNG=$(CURDIR)/docs/dashboard.png $(VENV)/bin/pytest -p no:cacheprovider \
		tests/e2e/test_monitoring.py

clean:
	rm -rf $(VENV)
