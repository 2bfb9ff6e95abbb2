#!/usr/bin/env bash
# Coverage-guided fuzzing of ShieldKey's parsers and scanners (cargo-fuzz / libFuzzer), bounded in
# time and memory, one target after another.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [--merge] [TARGET...]
#
#   scripts/fuzz.sh            # 20 s per target: the quick check (about 3 minutes with the build)
#   scripts/fuzz.sh 600        # the longer run, 10 minutes per target (about an hour)
#   scripts/fuzz.sh 600 --merge            # ... and keep what it found (see below)
#   scripts/fuzz.sh 60 usage_sse usage_json  # only these targets
#
# Each target starts from its committed seed corpus (fuzz/corpus/<target>/), which is passed to
# libFuzzer read-only, after a temporary directory that receives every new input: a run never
# changes the committed corpus. With --merge, the new inputs that add coverage are then minimised
# into the committed corpus (libFuzzer -merge=1). A long run can add hundreds of files, so review
# them and keep the corpus small (under 200 files in all) before committing.
#
# Exits non-zero if any target crashes, times out (10 s per input) or runs out of memory (2 GiB);
# the failing input is kept under fuzz/artifacts/<target>/ and the line to reproduce it is printed.
#
# Installs what it needs, once: the nightly toolchain (cargo-fuzz needs it for the sanitizer and
# coverage flags) and cargo-fuzz itself (into ~/.cargo/bin, from crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=20
merge=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --merge) merge=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    ''|*[!0-9]*) targets+=("$arg") ;;
    *) seconds=$arg ;;
  esac
done
if [ "$seconds" -lt 1 ]; then
  echo "fuzz: SECONDS_PER_TARGET must be at least 1" >&2
  exit 2
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

all_targets=(token_parse config_compile path_canonical request_body usage_json usage_sse)
if [ ${#targets[@]} -eq 0 ]; then
  targets=("${all_targets[@]}")
fi
for t in "${targets[@]}"; do
  if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
    echo "fuzz: no target '$t' (have: ${all_targets[*]})" >&2
    exit 2
  fi
done

# Release build with debug assertions and overflow checks, AddressSanitizer (cargo-fuzz default).
# The fuzz crate is its own workspace with its own target dir, whatever the environment says.
unset CARGO_TARGET_DIR
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin_dir="fuzz/target/$triple/release"
echo "== fuzz: building ${#targets[@]} target(s)"
if [ ${#targets[@]} -eq ${#all_targets[@]} ]; then
  (cd fuzz && cargo +nightly fuzz build -O -a --target-dir target)
else
  for t in "${targets[@]}"; do
    (cd fuzz && cargo +nightly fuzz build -O -a --target-dir target "$t")
  done
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/shieldkey-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

failed=()
summaries=()
for t in "${targets[@]}"; do
  seeds="fuzz/corpus/$t"
  new="$work/$t"
  artifacts="fuzz/artifacts/$t"
  log="$work/$t.log"
  mkdir -p "$seeds" "$new" "$artifacts"
  echo "== fuzz: $t for ${seconds}s ($(find "$seeds" -type f | wc -l) seeds)"
  status=0
  "$bin_dir/$t" "$new" "$seeds" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?

  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
  speed=$(sed -n 's/.* exec\/s: \([0-9]*\).*/\1/p' <<<"$done_line")
  found=$(find "$new" -type f | wc -l)
  if [ "$status" -eq 0 ]; then
    line=$(printf '%-15s ok    %10s execs  cov %5s  ft %6s  %7s exec/s  %4s new inputs' \
      "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${speed:-?}" "$found")
  else
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    line=$(printf '%-15s FAIL  exit %s  input: %s' "$t" "$status" "${crash:-none written}")
    failed+=("$t")
    echo "---- $t: what went wrong"
    if grep -q 'panicked at' "$log"; then
      sed -n '/panicked at/,/^stack backtrace:/p' "$log" | grep -v '^stack backtrace:' | head -n 20
    else
      grep -v -E '^#[0-9]+[[:space:]]|^ *#[0-9]+ 0x' "$log" | tail -n 20
    fi
    grep -E '^SUMMARY|^MS:|^Base64:' "$log" | tail -n 3 || true
    echo "---- reproduce: $bin_dir/$t ${crash:-<input>}"
  fi
  echo "$line"
  summaries+=("$line")

  if [ "$merge" -eq 1 ] && [ "$status" -eq 0 ] && [ "$found" -gt 0 ]; then
    before=$(find "$seeds" -type f | wc -l)
    "$bin_dir/$t" -merge=1 -timeout=10 -rss_limit_mb=2048 "$seeds" "$new" >"$work/$t.merge.log" 2>&1
    after=$(find "$seeds" -type f | wc -l)
    echo "   merged $((after - before)) new input(s) into $seeds"
  fi
done

echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summaries[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
