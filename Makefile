# jaxkd: the README's commands. Everything installs into ./.venv with pinned constraints.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --constraint requirements/constraints.txt
EXTRAS ?= cpu,weights,dev,demo,stt-base

# Compiles dominate small CPU runs; keep them across invocations.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

# MODEL empty: `make run` serves the newest trained run under runs/ (else the base preset);
# set it to a run dir, preset, .gguf or HF dir to choose.
MODEL    ?=
BASE_MODEL := qwen2.5-coder-0.5b-instruct
QUESTION ?= My Bluetooth earbuds keep disconnecting from my laptop every few minutes. How do I fix it?

.PHONY: setup setup-teacher system-deps run generate train demo test test-fast bench bench-generate bench-accel evaluate report clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e '.[$(EXTRAS)]'
	touch $@

# The 1.5B teacher's packaged weights (1.1 GB), needed only where the teacher runs.
setup-teacher: setup
	$(PIP) -e '.[teacher-weights]'

# Distil on the embedded default: the teacher stage rebuilds the top-k store from the committed
# answers (one forward pass each; it decodes only prompts it has no answer for), then the KD run.
# The default is the corpus recipe (224 grounded answers, 181 KD steps): its student is the first to
# beat the base on held-out records (evals/results/eval_corpus.md). CONFIG=configs/cpu_default.yaml
# is the short 80-answer, 40-step recipe.
CONFIG ?= configs/cpu_corpus.yaml
train: setup-teacher
	$(BIN)/python -m jaxkd.train --config $(CONFIG) stage=teacher
	$(BIN)/python -m jaxkd.train --config $(CONFIG) stage=kd

# Debian packages the tests use (speech synthesis for STT tests, Chromium for the browser test).
system-deps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox chromium chromium-driver >/dev/null; }

# The main job on the embedded default (real packaged weights, CPU): the newest trained run when one
# exists (its stderr names the model it loaded and why), else the base preset.
run: setup
	$(BIN)/python -m jaxkd.generate $(if $(MODEL),--model $(MODEL)) "$(QUESTION)"

generate: run

# Voice demo (Gradio on FastAPI); prints its URL.
demo: setup
	$(BIN)/python -m demo

# The slow real-judge tests load the 1.5B teacher's packaged weights: install them too.
test: setup-teacher system-deps
	$(BIN)/python -m pytest -q -rs

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# Throughput reports (evals/results/bench_*.md). bench-generate measures this checkout side by side
# with BASELINE (the code before issue 10), checked out once as a git worktree; it needs the
# teacher weights too (make setup-teacher). Run alone on the machine: it takes about an hour.
BASELINE     ?= b9562dc
BASELINE_DIR ?= $(CURDIR)/.bench-baseline-$(BASELINE)
bench: bench-generate
	$(BIN)/python -m evals.bench_kd_step --compute-dtypes float32 bfloat16 --low-memory dots

bench-generate: setup
	test -d $(BASELINE_DIR) || git worktree add --detach $(BASELINE_DIR) $(BASELINE)
	$(BIN)/python -m evals.bench_generate --model $(or $(MODEL),$(BASE_MODEL)) --baseline-src $(BASELINE_DIR)

# On a machine with an NVIDIA GPU, jax[cuda] and a CUDA PyTorch: the 1.5B / 7B shapes side by side
# with PyTorch / transformers (evals/results/bench_accel.md); about 8 minutes on one H200.
bench-accel:
	$(BIN)/python -m evals.bench_accel

EVAL_CONFIG ?= configs/eval_cpu.yaml
# Evaluate the models of $(EVAL_CONFIG) (answers, retention, throughput; judge when enabled) and
# write evals/results/eval_report.*; only what the caches lack is computed.
evaluate: setup
	$(BIN)/python -m evals.run --config $(EVAL_CONFIG)

# Rebuild the committed reports from the committed per-model results and caches (no model runs):
# evals/results/eval_report.{md,json,png} from the caches of `python -m evals.run --config $(EVAL_CONFIG)`.
# every committed report of evals.run whose caches are committed (configs/eval.yaml's are not)
EVAL_REPORTS ?= configs/eval_cpu.yaml configs/eval_corpus.yaml configs/eval_corpus_full.yaml configs/eval_corpus_judged.yaml
report: setup
	for c in $(EVAL_REPORTS); do $(BIN)/python -m evals.run --config $$c --report-only || exit 1; done
	for c in configs/eval_corpus_full.yaml configs/eval_corpus_judged.yaml; do $(BIN)/python -m evals.judge_diagnostics --config $$c || exit 1; done
	$(BIN)/python -m evals.domain --report --report-tags student_base student_kd student_kd_grounded teacher teacher_grounded
	$(BIN)/python -m evals.ablation

clean:
	rm -rf .jax_cache .pytest_cache build *.egg-info
