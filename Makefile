# The two commands: `make run` (ShieldKey with a demo policy) and `make test` (everything).
.PHONY: run test setup build soak fuzz fleet bench profile host-costs

run:
	scripts/run.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

build: setup
	scripts/build.sh

# A fleet on loopback: 3 etcd members, 2 Envoys following the policy in etcd (README).
fleet: build
	scripts/fleet.sh

# Long runs, documented in the README (not part of `make test`, which runs short versions).
soak: build
	.venv/bin/python tests/soak/soak.py --reloads 1000 --interval 0.25

fuzz:
	scripts/fuzz.sh 600

# Throughput, latency and Envoy CPU per request against plain Envoy and a minimal wasm filter,
# with wrk and h2load (installed if missing); README "Benchmarks". `make bench BENCH_ARGS=--quick`
# for a smoke test.
bench: build
	scripts/bench.sh $(BENCH_ARGS)

# Where the front Envoy's CPU goes per request (kernel, Envoy, the filter's wasm code, the host
# functions it calls), sampled with perf (installed if missing); README "Benchmarks".
profile: build
	scripts/profile.sh $(PROFILE_ARGS)

# What each kind of proxy-wasm host operation (filter state, shared data, body reads, ...) costs
# Envoy per request, measured on the minimal filter; README "Benchmarks".
host-costs: setup
	scripts/host_costs.sh $(HOST_COSTS_ARGS)
