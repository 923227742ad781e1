"""python -m fedcompress.gpucheck: exits 0 with a message without CUDA; its pieces (benchmarks with
their answer checks, the test runner and its JUnit summary, the table) work, run here on CPU at
small sizes, so the first run on a GPU machine is not also their first run."""

import os
import subprocess
import sys
import textwrap

import torch

from fedcompress import gpucheck as G


def test_without_cuda_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "fedcompress.gpucheck"], capture_output=True, text=True, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "no CUDA" in r.stdout and "nothing to check" in r.stdout


def _check_rows(rows, checks):
    assert [r.check for r in rows if r.vs == "(baseline)"] == checks  # one baseline per check, first
    for r in rows:
        assert not r.failed, (r.check, r.provider, r.result)
        assert r.median_ms > 0 and (r.gbs > 0 if r.check != "hypergradient" else r.gbs is None)
    assert all(r.result == "ok" for r in rows)


def test_bench_mask_on_cpu_checks_its_answers():
    rows = G.bench_mask("cpu", n=40_000, clients=3, n_mean=20_000, reps=1)
    _check_rows(rows, ["mask encode", "mask decode_mean"])
    assert [r.provider for r in rows] == ["torch x[rand < keep]", "fc RandomMask.encode", "torch scatter per client",
                                          "fc RandomMask.decode_mean"]  # fmt: skip


def test_bench_sz_on_cpu_same_bytes_as_the_cpu_path():
    _check_rows(G.bench_sz("cpu", n=30_000, reps=1), ["sz encode", "sz decode"])


def test_bench_hypergradient_on_cpu_matches_autograd():
    torch.set_num_threads(1)
    _check_rows(G.bench_hypergradient("cpu", m=2, b=2, n_real=8, size=12, reps=1), ["hypergradient"])


def test_a_failed_check_is_reported_not_hidden():
    rows = G._pair("x", "1 B", 1, "cpu", 1, "base", lambda: None, [("mine", lambda: None, "bytes differ")])
    assert rows[1].failed and "FAILED: bytes differ" in G.table(rows)


def test_junit_summary_counts_per_file():
    xml = """<testsuites><testsuite>
      <testcase classname="tests.test_dispatch" name="test_a[triton-cuda]"/>
      <testcase classname="tests.test_dispatch" name="test_b[cpp-cuda]"><skipped message="cpu only"/></testcase>
      <testcase classname="tests.test_dispatch" name="test_c[triton-cuda]"><failure message="boom"/></testcase>
      <testcase classname="tests.test_sz" name="test_d[torch-cuda]"/>
    </testsuite></testsuites>"""
    rows = G.junit_rows(xml)
    assert [(r.check, r.result, r.failed) for r in rows] == [
        ("tests test_dispatch.py -k cuda", "1 passed, 1 failed, 1 skipped: test_c[triton-cuda]", True),
        ("tests test_sz.py -k cuda", "1 passed, 0 failed, 0 skipped", False),
    ]


def test_run_tests_runs_pytest_and_reads_its_outcome(tmp_path):
    d = tmp_path / "tests"
    d.mkdir()
    (d / "conftest.py").write_text("")
    (d / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("device", ["cpu", "cuda"])
        def test_ok(device):
            assert device

        @pytest.mark.parametrize("device", ["cuda"])
        def test_bad(device):
            assert device == "cpu"
    """))
    rows = G.run_tests(str(d), timeout_s=120)
    assert [(r.result, r.failed) for r in rows] == [("1 passed, 1 failed, 0 skipped: test_bad[cuda]", True)]


def test_find_tests_dir_in_checkout():
    d = G.find_tests_dir()
    assert d is not None and os.path.isfile(os.path.join(d, "test_gpucheck.py"))



def test_main_end_to_end_on_cpu_prints_one_table(capsys):
    """The whole flow of the GPU run (dispatch rows, every bench, the table, the exit code), pointed at
    CPU with tiny sizes: what the first run on a GPU machine will execute, minus the device."""
    torch.set_num_threads(1)
    rc = G.main(["--device", "cpu", "--scale", "0.001", "--no-tests", "--reps", "1", "--budget-s", "300"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("| check | provider |") == 1
    for check in ("dispatch mask_encode", "mask encode", "mask decode_mean", "sz encode", "sz decode",
                  "hypergradient"):  # fmt: skip
        assert f"| {check} |" in out, check
    assert "FAILED" not in out
