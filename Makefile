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

# The main job on its defaults: the topology report of the DeepSeek-V3 cluster, whether
# DeepSeek-V3's published layout fits in its memory, and one simulated training step of it.
demo: build
	$(MOESIM) topo show configs/hardware/h800-2048.textproto
	@echo
	$(MOESIM) memory --cluster configs/hardware/h800-2048.textproto --model configs/models/deepseek-v3.textproto \
	  --workload configs/workloads/deepseek-v3-pretrain.textproto --strategy configs/strategies/deepseek-v3-published.textproto
	@echo
	$(MOESIM) simulate configs/scenarios/deepseek-v3-h800.textproto

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j$(JOBS)

# Every benchmark runs even when one misses its target; the exit code says whether all passed.
bench: build
	$(BUILD_DIR)/bench/topology_bench; t=$$?; \
	$(BUILD_DIR)/bench/costmodel_bench; c=$$?; \
	$(BUILD_DIR)/bench/moe_layer_bench; m=$$?; \
	$(MPIRUN) -np 2 $(BUILD_DIR)/bench/comm_bench; a=$$?; \
	$(BUILD_DIR)/bench/sim_bench; s=$$?; \
	exit $$((t | c | m | a | s))

clean:
	rm -rf $(BUILD_DIR)
