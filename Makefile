# The two commands a newcomer runs (README): `make demo` and `make test`.
# Both install missing system packages first (scripts/install-deps, quiet when all is there).
BUILD_DIR ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Warnings in moesim's own code are errors in CI (CI=true there).
WERROR := $(if $(filter true 1,$(CI)),ON,OFF)
MOESIM := $(BUILD_DIR)/cli/moesim
# Two MPI ranks on this machine (root needs --allow-run-as-root; --oversubscribe: 2 cores).
MPIRUN := mpirun --oversubscribe $(if $(filter 0,$(shell id -u)),--allow-run-as-root)

.PHONY: deps configure build demo test bench clean

deps:
	@scripts/install-deps

configure: deps
	@cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release -DMOESIM_WERROR=$(WERROR) >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j$(JOBS)

# The main job on its defaults: plan Mixtral 8x7B training on 64 H100s (every layout, pruned by
# memory, ranked, the best simulated), replay the winner op by op with its timeline, and write a
# report with figures. Everything lands in $(DEMO_DIR).
DEMO_DIR := $(BUILD_DIR)/demo
demo: build
	@mkdir -p $(DEMO_DIR)
	$(MOESIM) plan --cluster configs/hardware/h100-64.textproto --model configs/models/mixtral-8x7b.textproto \
	  --workload configs/workloads/mixtral-8x7b-train.textproto --out $(DEMO_DIR)/best.plan.textproto --db $(DEMO_DIR)/results.db
	@echo
	$(MOESIM) simulate --plan $(DEMO_DIR)/best.plan.textproto --trace $(DEMO_DIR)/step.json --db $(DEMO_DIR)/results.db
	@echo
	$(MOESIM) report --db $(DEMO_DIR)/results.db --out $(DEMO_DIR)/report
	@echo
	@echo "timeline: $(DEMO_DIR)/step.json (chrome://tracing or ui.perfetto.dev); report: $(DEMO_DIR)/report/report.md"

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j$(JOBS)

# Every benchmark runs even when one misses its target; the exit code says whether all passed.
bench: build
	$(BUILD_DIR)/bench/topology_bench; t=$$?; \
	$(BUILD_DIR)/bench/costmodel_bench; c=$$?; \
	$(BUILD_DIR)/bench/moe_layer_bench; m=$$?; \
	$(MPIRUN) -np 2 $(BUILD_DIR)/bench/comm_bench; a=$$?; \
	$(BUILD_DIR)/bench/sim_bench; s=$$?; \
	$(MOESIM) calibrate --out $(BUILD_DIR)/bench-local.textproto --ranks 2 && \
	  $(MOESIM) validate --suite --cluster $(BUILD_DIR)/bench-local.textproto --steps 30 --out $(BUILD_DIR)/bench-suite; v=$$?; \
	exit $$((t | c | m | a | s | v))

clean:
	rm -rf $(BUILD_DIR)
