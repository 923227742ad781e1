"""A bounded fuzz pass over every decoder (the long pass: `python -m fedcompress.fuzz --cases 1000000`)."""

import json
import os
import subprocess
import sys

import pytest

from fedcompress import fuzz
from fedcompress.errors import FormatError

CI_SECONDS = float(os.environ.get("FEDCOMPRESS_FUZZ_SECONDS", "75"))


def test_mutations_hit_the_checksum_or_are_recrc():
    import random

    from fedcompress.api import RoundContext, get_compressor

    good = get_compressor("none").compress(fuzz._rand_state(random.Random(0)), RoundContext())
    rng = random.Random(1)
    kinds = {fuzz.mutate(rng, good, good)[1] for _ in range(200)}
    assert kinds == {True, False}  # both raw corruptions and re-checksummed structural ones occur


def test_bounded_fuzz_pass_finds_no_bug():
    out = subprocess.run(
        [sys.executable, "-m", "fedcompress.fuzz", "--cases", "200000", "--chunk", "100000", "--seconds",
         str(CI_SECONDS), "--json",
         # 1 s is the long pass's hang limit; a loaded CI machine gets more slack, real hangs still show
         "--hang-seconds", "5"],
        capture_output=True, text=True, timeout=CI_SECONDS + 300,
    )
    s = json.loads(out.stdout)
    print(json.dumps({k: v for k, v in s.items() if k != "per_target"}, indent=1))
    assert s["cases"] > 1000
    assert (s["crashes"], s["hangs"], s["other_errors"], s["undetected"], s["over_limit_workers"]) == (0, 0, 0, 0, 0), s
    targets = {k.rsplit(":", 1)[0] for k in s["per_target"]}
    assert targets == set(fuzz.TARGETS), f"targets not exercised: {set(fuzz.TARGETS) - targets}"
    assert out.returncode == 0


@pytest.mark.parametrize("payload", [b"", b"FCMP", b"\x00" * 100, b"FCMP\x01\x00\x01\x00" + b"\xff" * 64])
def test_garbage_raises_format_error_for_every_target(payload):
    for t in fuzz.TARGETS.values():
        with pytest.raises(FormatError):
            t.decode(payload)
