# Shortcuts for the scripts in packaging/ and bench/; each installs what it needs first.
SHELL := /bin/bash
PYTEST_ARGS ?=

.PHONY: deps demo test test-fast deb bench clean

deps:
	bash packaging/install-deps.sh

demo:
	bash packaging/demo.sh

# The full suite, the systemd end-to-end package test included (needs root).
test:
	bash packaging/test.sh $(PYTEST_ARGS)

# Everything but the slow package test.
test-fast:
	bash packaging/test.sh -m "not systemd" $(PYTEST_ARGS)

deb: deps
	bash packaging/build-deb.sh

bench: deps
	bash bench/run-all.sh

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache debian/.debhelper debian/attune-sensor debian/files \
	    debian/*.substvars debian/debhelper-build-stamp .pybuild
