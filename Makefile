# The two commands: `make run` (ShieldKey with a demo policy) and `make test` (everything).
.PHONY: run test setup build

run:
	scripts/run.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

build: setup
	scripts/build.sh
