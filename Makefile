# Every target that runs project code depends on the virtual environment, so on a fresh clone
# `make demo` and `make test` need no earlier step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# `make shards` with no URL_LIST builds the embedded demo corpus; with URL_LIST=... it shards it.
DEMO := data/demo
SHARDS ?= $(DEMO)
URL_LIST ?=
SHARDS_ARGS ?=
CONFIG ?= configs/tiny_demo.toml
TRAIN_ARGS ?=

.PHONY: install shards curate validate tokenizer train eval demo demo-flat test bench bench-learning gpu-pack gpu-check-dry clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

shards: $(STAMP)
	$(PY) -m data_pipeline.shards --output $(SHARDS) $(if $(URL_LIST),--url-list $(URL_LIST)) $(SHARDS_ARGS)

# Curate a shard pool (data_pipeline/curate/): exact and near dedup, caption filters,
# decontamination and, with a model, the CLIP-score filter. The default is `make demo`'s
# curation of the noisy demo pool: a filter CLIP bootstrapped on a trusted seed set (DFN-style),
# 16x16 pixel dedup instead of perceptual hashes (colour-blind on flat renders) and no embedding
# dedup (a model's embeddings call two renders of one scene duplicates). With a published CLIP:
# CURATE_ARGS="--pretrained FILE --model vit_b32_quickgelu --clip-score-top 0.3" (README).
NOISY := data/demo_pool
NOISY_SEED := data/demo_seed
NOISY_CURATED := data/demo_curated
DEMO_RUN := runs/tiny_demo_curated
NOISY_CURATE_ARGS := --bootstrap $(NOISY_SEED)/train --bootstrap-set train.epochs=5 --clip-score-top 0.7 \
	--no-hash-dedup --pixel-dedup --no-model-dedup --no-shards --decontaminate demo=$(NOISY)
CURATE_SHARDS ?= $(NOISY)/train
CURATED ?= $(NOISY_CURATED)
CURATE_ARGS ?= $(NOISY_CURATE_ARGS)
curate: $(STAMP)
	$(PY) -m data_pipeline.curate --shards $(CURATE_SHARDS) --out $(CURATED) $(CURATE_ARGS)

validate: $(STAMP)
	$(PY) -m data_pipeline.validate $(SHARDS)

# A byte-level BPE trained on the demo's training captions, saved beside the shards.
tokenizer: $(STAMP)
	$(PY) -m training.text.tokenizer --shards $(DEMO)/train --out $(DEMO)/tokenizer.json

train: $(STAMP)
	$(PY) -m training.main --config $(CONFIG) checkpoint.resume=latest $(TRAIN_ARGS)

# The main job on the embedded default, through curation: a noisy pool (web-like noise planted,
# the truth in noise.json) and a trusted seed set -> validate -> tokenizer -> curate (a filter
# CLIP bootstrapped on the seed set, DFN-style) -> train on the kept pairs (data.keep_list,
# nothing copied) -> eval -> a report with what curation removed against the truth next to how
# well the model learned. Re-running is cheap: finished shards, the filter model, the embeddings
# and a finished run are reused.
demo: $(STAMP)
	$(PY) -m data_pipeline.shards --output $(NOISY) --noise --incremental
	$(PY) -m data_pipeline.shards --output $(NOISY_SEED) --num-samples 4000 --seed 101 --texture --incremental
	$(PY) -m data_pipeline.validate $(NOISY)
	test -f $(NOISY)/tokenizer.json || $(PY) -m training.text.tokenizer --shards $(NOISY)/train --out $(NOISY)/tokenizer.json
	$(PY) -m data_pipeline.curate --shards $(NOISY)/train --out $(NOISY_CURATED) $(NOISY_CURATE_ARGS)
	$(PY) -m training.main --config configs/tiny_demo.toml checkpoint.resume=latest data.train_shards=$(NOISY)/train \
		data.keep_list=$(NOISY_CURATED)/keep_list.parquet train.run_dir=$(DEMO_RUN)
	$(PY) -m eval.run --checkpoint $(DEMO_RUN) --demo $(NOISY)
	$(PY) -m training.report --run-dir $(DEMO_RUN) --shards $(NOISY)

# The same model on the clean flat corpus, no curation (what `make shards`, `make tokenizer`,
# `make train` and `make eval` build and read one step at a time).
demo-flat: $(STAMP)
	$(PY) -m data_pipeline.shards --output $(DEMO) --incremental
	$(PY) -m data_pipeline.validate $(DEMO)
	test -f $(DEMO)/tokenizer.json || $(PY) -m training.text.tokenizer --shards $(DEMO)/train --out $(DEMO)/tokenizer.json
	$(PY) -m training.main --config configs/tiny_demo.toml checkpoint.resume=latest
	$(PY) -m eval.run --checkpoint runs/tiny_demo --demo $(DEMO)
	$(PY) -m training.report --run-dir runs/tiny_demo --shards $(DEMO)

# Zero-shot / retrieval suites against a run's newest checkpoint (see README "Evaluate").
RUN ?= runs/tiny_demo
EVAL_ARGS ?= --demo $(DEMO)
eval: $(STAMP)
	$(PY) -m eval.run --checkpoint $(RUN) $(EVAL_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Speed next to its yardsticks (OpenCLIP's trainer and loader, CLIP_benchmark, the matmul peak)
# -> bench/results.md and bench/results.json; ~9-35 min on 2 CPU cores (bf16 vs fp32 machines), builds its 256-px corpus
# into data/bench on first use. BENCH_ARGS=--quick for a smoke test (numbers not for quoting).
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench.run_all $(BENCH_ARGS)

# Learning per sample and per second next to open_clip_train (~20 min; LEARNING_ARGS="--preset
# issue" for issue #16's settings, ~2.5 h) -> bench/sample_efficiency.md and .json.
LEARNING_ARGS ?=
bench-learning: $(BENCH_STAMP)
	$(PY) -m bench.sample_efficiency $(LEARNING_ARGS)

# The GPU check (bench/gpu_check.sh, issue #17). A GPU image has torch, torchvision, timm and
# OpenCV but no network: `make gpu-pack` puts the other packages (Python 3.12 wheels) in .whl/
# and builds the bench corpus; carry `.whl` and `data/bench/corpus` to the GPU machine and run
# `bash bench/gpu_check.sh` there (-> bench/results_gpu.md). `make gpu-check-dry` runs every step
# once on this CPU.
GPU_WHEELS := webdataset==0.2.86 braceexpand==0.1.7 open_clip_torch==3.3.0 clip_benchmark==1.6.2 \
	ftfy==6.3.1 wcwidth==0.9.4 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 simplejpeg==1.9.0
gpu-pack: $(BENCH_STAMP)
	$(PY) -m bench.corpus
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	du -sh .whl data/bench/corpus

gpu-check-dry: $(BENCH_STAMP)
	bash bench/gpu_check.sh --dry-run

clean:
	rm -rf data runs
