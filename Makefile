# The two README commands live here:
#   make demo   install everything (CPU build of torch) and open napari with the plugin,
#               the bundled sample phantom and the default model's prediction
#   make test   install everything and run the whole test suite (what .ci/run calls)
# GPU users: see README "Installing for a GPU".

VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-xinerama0 \
                   libxkbcommon-x11-0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
                   libxcb-image0 libgl1 libegl1 libfontconfig1 libdbus-1-3

.PHONY: install system-deps demo test lint bench clean

system-deps:
	@if ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-icccm.so.4; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $@

install: system-deps $(VENV)/.installed

demo: install
	$(VENV)/bin/napari-pvs gui --sample T2 --segment

test: install
	QT_API=pyqt6 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q --durations=15 tests
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/npe2 validate napari-pvs

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

bench: install
	$(PY) benchmarks/bench_open.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
