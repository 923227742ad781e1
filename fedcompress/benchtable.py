"""``fedcompress bench``: run the pytest-benchmark files in ``bench/`` and print one table.

The table is read from each benchmark's ``extra_info``, whose keys are fixed by ``EXTRA_INFO``
below (schema ``BENCH_SCHEMA``): a bench file states what it measured instead of the table guessing
it from test names and words. A benchmark without ``extra_info["schema"]`` is read the old way
(``legacy_fields``: group or test name for the op, words such as "pysz" or "memcpy" for peers,
``nbytes``/``input_GB``/``input_MB`` for the size) until every bench file sets the schema.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

BENCH_SCHEMA = 1
# key -> (type, required, meaning). Rows with the same (op, case) are compared with each other.
EXTRA_INFO: dict[str, tuple[type | tuple[type, ...], bool, str]] = {
    "schema": (int, True, f"the schema version this benchmark follows: {BENCH_SCHEMA}"),
    "op": (str, True, "what is measured, as the table names it, e.g. 'mask encode' or 'sz decode'"),
    "provider": (str, True, "who does it, e.g. 'fc-cpp', 'fc-triton', 'torch', 'pysz', 'memcpy'"),
    "case": (str, False, "the input, when an op runs on several (e.g. 'update rel=0.01'); default ''"),
    "input_bytes": ((int, float), True, "bytes of input the op reads (MB/s is input_bytes / median)"),
    "payload_bytes": ((int, float), False, "bytes it produced (compressed size: ratio = input / payload)"),
    "load": (str, False, "the machine load it ran under ('quiet', 'busy': bench/conftest.py sets it); default ''"),
    "peer": (bool, False, "True for a yardstick (another library, plain torch, memcpy); default False"),
    "times_s": (list, False, "per-call seconds measured by the benchmark itself (child processes); the "
                "table takes their median instead of pytest-benchmark's"),
}  # fmt: skip
# legacy benchmarks only: a provider containing one of these words is a peer
PEER_WORDS = ("pysz", "zfpy", "zstd", "zlib", "naive", "higher", "torchopt", "create_graph", "memcpy")


def find_bench_dir(start: str | None = None) -> str | None:
    """bench/ of a source checkout: beside the package (editable install) or under the cwd."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(here, "bench"), os.path.join(start or os.getcwd(), "bench")):
        if os.path.isdir(d) and any(f.startswith("bench_") and f.endswith(".py") for f in os.listdir(d)):
            return d
    return None


def schema_fields(b: dict) -> dict:
    """(op, provider, input_bytes, payload_bytes, peer, times) of a benchmark that sets the schema;
    ValueError naming the benchmark and the key when a key is missing or of the wrong type."""
    ex = b.get("extra_info") or {}
    if ex.get("schema") != BENCH_SCHEMA:
        raise ValueError(f"benchmark {b.get('fullname', b.get('name'))}: extra_info['schema'] is "
                         f"{ex.get('schema')!r}, this table reads schema {BENCH_SCHEMA}")
    for key, (typ, required, meaning) in EXTRA_INFO.items():
        if key not in ex:
            if required:
                raise ValueError(f"benchmark {b.get('fullname', b.get('name'))}: extra_info lacks {key!r} ({meaning})")
            continue
        if not isinstance(ex[key], typ) or (typ is not bool and isinstance(ex[key], bool)):
            raise ValueError(f"benchmark {b.get('fullname', b.get('name'))}: extra_info[{key!r}] = {ex[key]!r} "
                             f"is not {typ} ({meaning})")
    op = " ".join(s for s in (ex["op"], ex.get("case", ""), f"load={ex['load']}" if ex.get("load") else "") if s)
    return {"op": op, "provider": ex["provider"], "input_bytes": float(ex["input_bytes"]),
            "payload_bytes": ex.get("payload_bytes"), "peer": bool(ex.get("peer", False)),
            "times": ex.get("times_s")}  # fmt: skip


def _legacy_provider(b: dict) -> str:
    params = b.get("params") or {}
    if "provider" in params:
        return str(params["provider"])
    name = re.sub(r"\[.*\]$", "", b["name"])
    name = re.sub(r"^test_", "", name)
    group = (b.get("group") or "").split("-")[0]
    if group and name.startswith(group + "_"):
        name = name[len(group) + 1 :]
    return name


def legacy_fields(b: dict) -> dict:
    """The same fields for a benchmark written before the schema, guessed as the table always did."""
    ex = b.get("extra_info") or {}
    file = os.path.basename(b.get("fullname", "").split("::")[0]).replace(".py", "")
    op = b.get("group") or file.replace("bench_", "")
    if op == file.replace("bench_", "") or not b.get("group"):
        op = file.replace("bench_", "") + ":" + re.sub(r"^test_|\[.*$", "", b["name"])
    params = {k: v for k, v in (b.get("params") or {}).items() if k != "provider"}
    if params:  # e.g. bench_sz's array and error bound: peers are compared on the same input only
        op += " " + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    nbytes = None
    for k, scale in (("input_bytes", 1), ("input_MB", 1e6), ("input_GB", 1e9), ("nbytes", 1)):
        if isinstance(ex.get(k), (int, float)):
            nbytes = float(ex[k]) * scale
            break
    times = ex.get("times_s") if isinstance(ex.get("times_s"), list) and ex["times_s"] else None
    if times is None and isinstance(ex.get("median_s"), (int, float)):
        times = [float(ex["median_s"])]
    provider = _legacy_provider(b)
    mbs = ex.get("MB/s")
    if mbs is None and isinstance(ex.get("GB/s (median)"), (int, float)):
        mbs = ex["GB/s (median)"] * 1e3
    return {"op": op, "provider": provider, "input_bytes": nbytes, "payload_bytes": ex.get("payload_bytes"),
            "peer": any(w in provider for w in PEER_WORDS), "times": times, "MB/s": mbs,
            "ratio": ex.get("ratio")}  # fmt: skip


def bench_rows(data: dict) -> list[dict]:
    """Rows (op, provider, size, MB/s, ratio, speed vs peers) from a pytest-benchmark JSON."""
    rows = []
    for b in data.get("benchmarks", []):
        if b["name"].startswith("test_table"):
            continue
        ex = b.get("extra_info") or {}
        f = schema_fields(b) if "schema" in ex else legacy_fields(b)
        med = float(statistics.median(f["times"])) if f["times"] else float(b["stats"]["median"])
        nbytes, payload = f["input_bytes"], f["payload_bytes"]
        mbs = f.get("MB/s")
        if mbs is None and nbytes:
            mbs = nbytes / 1e6 / med
        ratio = f.get("ratio")
        if ratio is None and nbytes and isinstance(payload, (int, float)) and payload:
            ratio = nbytes / payload
        rows.append({"op": f["op"], "provider": f["provider"], "input_bytes": nbytes, "median_s": med,
                     "MB/s": mbs, "ratio": ratio, "is_peer": f["peer"]})  # fmt: skip
    for r in rows:
        if r["is_peer"]:  # peers are the yardstick; speed-ups are given for fedcompress rows
            r["vs_peers"] = r["ratio_vs_peers"] = {}
            continue
        peers = [p for p in rows if p["op"] == r["op"] and p is not r and p["is_peer"]]
        r["vs_peers"] = {p["provider"]: p["median_s"] / r["median_s"] for p in peers if r["median_s"] > 0}
        r["ratio_vs_peers"] = {
            p["provider"]: r["ratio"] / p["ratio"] for p in peers if r["ratio"] and p["ratio"]
        }
    return rows


def _fmt(v, f="{:.1f}") -> str:
    return "—" if v is None else f.format(v)


def bench_table(rows: list[dict]) -> str:
    lines = [
        "| op | provider | input | median (s) | MB/s | ratio | speed vs peers (peer time / this time) "
        "| ratio vs peers (this ratio / peer's) |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        size = "—" if r["input_bytes"] is None else f"{r['input_bytes'] / 1e6:.1f} MB"
        rv = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("ratio_vs_peers", {}).items()) or "—"
        vs = ", ".join(f"{k} {v:.2f}x" for k, v in r["vs_peers"].items()) or (
            "(peer)" if r.get("is_peer") else "—"
        )
        lines.append(
            f"| {r['op']} | {r['provider']} | {size} | {r['median_s']:.4f} | {_fmt(r['MB/s'])} | "
            f"{_fmt(r['ratio'], '{:.2f}')} | {vs} | {rv} |"
        )
    return "\n".join(lines) + "\n"


# --quick: the bench files fix their own rounds (benchmark.pedantic), so speed comes from the
# selection: mask encode against naive torch and memcpy (25M floats), and bench_sz on the real
# client update at REL 1e-2 (every provider but the slow torch reference). The
# FedSynth hypergradient (one child process per provider: the slowest group) and the 100-client
# decode_mean groups run only without --quick.
QUICK_K = (
    "(bench_mask and encode and not randperm and not triton) or "
    "(bench_sz and update and not fc-torch and not 0.001)"
)


def run_bench(
    bench_dir: str, quick: bool, k: str | None, files: list[str] | None, log=print
) -> tuple[int, str]:
    targets = [os.path.join(bench_dir, f) for f in files] if files else [bench_dir]
    with tempfile.TemporaryDirectory() as tmp:
        js = os.path.join(tmp, "bench.json")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *targets,
            "--benchmark-only",
            f"--benchmark-json={js}",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            os.path.dirname(bench_dir),
            "-o",
            "python_files=bench_*.py",
        ]
        if quick:
            cmd += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]
        kexpr = k or (QUICK_K if quick else None)
        if kexpr:
            cmd += ["-k", kexpr]
        log("[bench] " + " ".join(cmd))
        env = dict(os.environ, FEDCOMPRESS_BENCH_QUICK="1" if quick else "0")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not os.path.exists(js):
            return 1, proc.stdout[-4000:] + "\n[bench] pytest wrote no benchmark JSON"
        with open(js) as f:
            data = json.load(f)
    tail = (
        ""
        if proc.returncode == 0
        else f"\n[bench] pytest exit code {proc.returncode}:\n{proc.stdout[-3000:]}"
    )
    return (0 if data.get("benchmarks") else 1), bench_table(bench_rows(data)) + tail
