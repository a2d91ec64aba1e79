# fastattn: `make test` (set up + build + all tests) and `make demo` (set up + the main job) on a fresh machine.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
# CI compiles the CUDA kernels for one arch to bound build time; a release build uses "80;90".
CUDA_ARCHS  ?= 80
MAX_JOBS    ?= 2
export MAX_JOBS

.PHONY: help venv build install test pytest cmake-test demo bench gpu-check wheel info clean

help:
	@echo "make test       create $(VENV), install deps, build (CPU + CUDA sources), run pytest and the C++ test"
	@echo "make demo       set up, then run the main job (train the seed CNN, RNN and a small Transformer, fastattn vs torch)"
	@echo "make bench      run all benchmarks (writes benchmarks/out/)"
	@echo "make gpu-check  on a CUDA machine: build, GPU tests, compute-sanitizer, benchmarks -> reports/"
	@echo "make cmake-test build the C++ library with CMake (find_package(Torch)) and run ctest"
	@echo "make wheel      build a wheel into dist/"

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "triton>=3.0" numpy pytest ninja pybind11 "setuptools>=64" wheel \
	    hypothesis matplotlib tqdm scikit-learn expecttest
	touch $@

venv: $(VENV)/.deps-installed

# Build the extension in place (incremental: ninja keeps objects under build/).
# CUDA sources are compiled whenever nvcc is present, GPU or not (FASTATTN_FORCE_CUDA=1);
# FASTATTN_SKIP_CUDA=1 skips them.
build: venv
	FASTATTN_FORCE_CUDA=$${FASTATTN_FORCE_CUDA:-1} FASTATTN_CUDA_ARCHS="$${FASTATTN_CUDA_ARCHS:-$(CUDA_ARCHS)}" \
	    $(PY) setup.py -q build_ext --inplace
	@$(PY) -c "from fastattn import _C; print('fastattn._C built: CUDA kernels compiled =', _C.compiled_with_cuda(), 'archs =', _C.cuda_archs() or '-')"

# An installed (editable) package with the `fastattn` console script.
install: venv
	FASTATTN_FORCE_CUDA=$${FASTATTN_FORCE_CUDA:-1} FASTATTN_CUDA_ARCHS="$${FASTATTN_CUDA_ARCHS:-$(CUDA_ARCHS)}" \
	    $(PY) -m pip install --no-build-isolation -e .

# FASTATTN_EXPECT_CUDA_BUILD makes a test check that the CUDA sources really were compiled.
pytest: build
	FASTATTN_EXPECT_CUDA_BUILD=$$(command -v nvcc >/dev/null && [ "$${FASTATTN_SKIP_CUDA:-0}" != 1 ] && echo 1 || echo 0) \
	    $(PY) -m pytest tests -q -p no:cacheprovider

# cmake-test first, so the run closes on pytest's summary line.
test: cmake-test pytest

cmake-test: venv
	cmake -S . -B build-cmake -G Ninja $$($(PY) tools/cuda_env.py cmake) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build-cmake -j $(MAX_JOBS)
	ctest --test-dir build-cmake --output-on-failure

info: build
	$(PY) -m fastattn info

# The main job: train the seed CNN, the seed RNN and a small Transformer LM briefly on CPU,
# impl=fastattn vs impl=torch, then print the table and write plots under runs/demo.
demo: build
	$(PY) -m fastattn info
	$(PY) -m fastattn.demo --threads $${DEMO_THREADS:-2}

bench: build
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# On a GPU machine there is usually no venv: use the system python that has torch (PYTHON=...).
gpu-check:
	$(PYTHON) tools/gpu_check.py

wheel: venv
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build build-cmake build-cmake.log dist *.egg-info fastattn/_C*.so benchmarks/out
