# The two commands: `make run` (ShieldKey with a demo policy) and `make test` (everything).
.PHONY: run test setup build soak fuzz

run:
	scripts/run.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

build: setup
	scripts/build.sh

# Long runs, documented in the README (not part of `make test`, which runs short versions).
soak: build
	.venv/bin/python tests/soak/soak.py --reloads 1000 --interval 0.25

fuzz:
	scripts/fuzz.sh 600
