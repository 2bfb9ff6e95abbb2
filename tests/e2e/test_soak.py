"""The short soak (tests/soak/soak.py): 200 live policy changes of a 2,000-token policy under
mixed traffic at 2 workers. Envoy's heap in use must stay flat after warm-up, every complete
response charged exactly, no 5xx from the filter, no panic.

The bound: at most 4 MiB of heap growth after warm-up and 16 KiB per reload by least squares.
A store that keeps a key per configuration grew about 280 KiB per reload here (about 20 MiB over
90 reloads), so it fails by a wide margin; the flat store measured +0.1 MiB and +0.4 KiB per
reload."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soak"))

import soak  # noqa: E402

MAX_GROWTH_MIB = 4
# Envoy's heap swings by about a MiB with the traffic in flight, so over 150 samples the slope
# of an unchanged build read 2.9, 6.8 and 8.1 KiB per reload in three runs (the 1000-reload
# `make soak` reads +1.1). 16 KiB still fails a leak 17 times smaller than the one this test was
# written for (+279 KiB per reload); the 4 MiB total is the other bound.
MAX_SLOPE_KIB = 16


def test_memory_stays_flat_across_200_policy_changes(tmp_path):
    result = soak.run(reloads=200, interval=0.05, tokens=2000, workdir=tmp_path)
    print(result.report())
    grown, slope = result.heap_growth_after_warmup()
    assert result.reloads == 200
    assert grown <= MAX_GROWTH_MIB * 1024 * 1024, result.report()
    assert slope <= MAX_SLOPE_KIB * 1024, result.report()
    assert result.statuses.get(200, 0) > 1000 and result.statuses.get(429, 0) > 0, result.report()
    assert result.recorded_spend == result.expected_spend > 0, result.report()
    assert result.filter_5xx == 0 and result.panics == 0, result.report()
    assert -1 not in result.statuses, result.report()
