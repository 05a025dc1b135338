# prebake: `make convert` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?=
# OUT: MODEL's whole name (a checkpoint file's extension dropped) + "-baked": Qwen2.5-0.5B -> Qwen2.5-0.5B-baked
CKPT_EXT := .bin .pt .pth .safetensors .gguf .ckpt
SRCNAME = $(MODEL:/=)
OUT    ?= $(if $(MODEL),$(if $(filter $(suffix $(SRCNAME)),$(CKPT_EXT)),$(basename $(SRCNAME)),$(SRCNAME))-baked,build/demo-baked)
ARGS   ?=
N      ?= 1000
SEED   ?= 0
JOBS   ?= 1

.PHONY: convert test bench fuzz lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## convert MODEL=path [OUT=path] [ARGS="--dtype bfloat16 ..."]: bake a checkpoint (a demo one if no MODEL)
convert: $(STAMP)
ifeq ($(MODEL),)
	$(BIN)/python -m prebake.convert.demo build/demo
	$(BIN)/prebake convert build/demo $(OUT) $(ARGS)
else
	$(BIN)/prebake convert "$(MODEL)" "$(OUT)" $(ARGS)
endif
	$(BIN)/prebake inspect "$(OUT)"

## test: the default test run (benchmarks excluded)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## bench: the benchmarks, each printing ratios against its peer measured in the same run
bench: $(STAMP)
	$(BIN)/python -m tests.bench

## fuzz [N=1000] [SEED=0] [JOBS=1]: N mutated inputs per reader (tests/fuzz), each in a sandboxed child; prints
## the table (clean errors, correct bakes, one column per defect class) and the time; defects, minimized, go
## to build/fuzz/defects (replay one: python -m tests.fuzz --replay DIR)
fuzz: $(STAMP)
	nice -n 19 $(BIN)/python -m tests.fuzz --n $(N) --seed $(SEED) --jobs $(JOBS) --save build/fuzz/defects --minimize

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache
