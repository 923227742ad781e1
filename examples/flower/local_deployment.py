"""Start a SuperLink and SuperNodes on this machine, run the example for several compressors.

    python examples/flower/local_deployment.py --compressors "none;sz:rel=1e-2;mask:keep=0.125" \\
        --rounds 3 --out /tmp/fc-flower

starts ``flower-superlink --insecure`` and ``--nodes`` ``flower-supernode`` processes on 127.0.0.1
(free ports, all Flower state under ``--out``), submits one ``flwr run`` per compressor (they run
concurrently), waits, prints one line per compressor (upstream bytes, ratio, accuracy, seconds) and
stops every process it started. tests/test_flower.py uses the same ``Deployment`` class. For
several machines, see docs/flower.md: the same commands with real addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(base: Path) -> dict[str, str]:
    """os.environ with Flower's state (FLWR_HOME, HOME, the example's data cache) under ``base``."""
    base = Path(base)
    env = dict(os.environ)
    for d in ("home", "flwr"):
        (base / d).mkdir(parents=True, exist_ok=True)
    bindir = os.path.dirname(sys.executable)  # SuperLink/SuperNode start flower-superexec by name
    env.update(
        HOME=str(base / "home"),
        FLWR_HOME=str(base / "flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # Each ClientApp process caches its data partition here (examples/flower task.py).
        FEDCOMPRESS_EXAMPLE_CACHE=str(base / "cache"),
        PATH=bindir + os.pathsep + env.get("PATH", ""),
    )
    return env


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


CONNECTION = "local-deployment"  # the connection name in $FLWR_HOME/config.toml that flwr commands use


class Deployment:
    """A SuperLink and SuperNodes started as subprocesses; ``stop`` ends every one of them.

    ``commands`` (optional) replaces the built-in command lines: {"superlink": argv, "supernodes":
    [argv, ...], "port": the SuperLink's port, "node_ports": [...], "config_toml": text}; the tests pass
    the README's own commands this way, so the README is what they run.
    """

    def __init__(self, base: Path, n_nodes: int = 2, app_dir: Path = APP_DIR, commands: dict | None = None) -> None:
        self.base = Path(base)
        self.app_dir = Path(app_dir)
        self.env = flower_env(base)
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.commands = commands
        self.port = commands["port"] if commands else free_port()
        self.n_nodes = len(commands["supernodes"]) if commands else n_nodes

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.base / f"{name}.log"
        f = open(log, "wb")
        # Own session: stop() signals the process group, which also holds the flower-superexec and
        # flwr-clientapp/serverapp children these processes start.
        p = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        f.close()
        self.procs.append((name, p, log))
        return p

    def logs(self) -> str:
        out = []
        for name, _, log in self.procs:
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(f"--- {name} (last 3000 chars) ---\n{text[-3000:]}")
        return "\n".join(out)

    def _wait(self, what: str, ok, timeout: float) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            for name, p, _ in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}"
                    )
            if ok():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def start(self) -> None:
        c = self.commands or {}
        self._start(
            "superlink",
            c.get("superlink") or
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        self._wait("the SuperLink", lambda: healthy(self.port), 90)
        node_ports = list(c.get("node_ports", []))
        for i in range(self.n_nodes):
            if c:
                cmd = c["supernodes"][i]
            else:
                node_ports.append(free_port())  # two SuperNodes on one machine need distinct ports
                cmd = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                       "--host", "127.0.0.1", "--port", str(node_ports[i]),
                       "--node-config", f"partition-id={i} num-partitions={self.n_nodes}"]  # fmt: skip
            self._start(f"supernode{i}", cmd)
        self._wait("the SuperNodes", lambda: all(healthy(q) for q in node_ports), 90)
        (self.base / "flwr" / "config.toml").write_text(
            c.get("config_toml")
            or f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._wait("both SuperNodes online", self._nodes_online, 90)

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        r = subprocess.run(
            ["flwr", *args, "--format", "json"], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"flwr {' '.join(args)} gave no JSON (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
            ) from None

    def _nodes_online(self) -> bool:
        nodes = self.flwr("supernode", "ls", CONNECTION).get("nodes", [])
        return sum(n.get("status") == "online" for n in nodes) >= self.n_nodes

    def submit(self, run_config: dict) -> str:
        """``flwr run`` the example with ``run_config`` (written as a TOML file); returns the run id."""
        path = self.base / f"run-{len(list(self.base.glob('run-*.toml')))}.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        out = self.flwr("run", str(self.app_dir), CONNECTION, "--run-config", str(path))
        if not out.get("success"):
            raise RuntimeError(f"flwr run failed: {out}")
        return str(out["run-id"])

    def wait_run(self, run_id: str, timeout: float, done_file: Path | None = None) -> None:
        """Wait until the run is ``finished:completed``; raise with its log if it failed.

        ``flwr run``'s exit code does not tell failure, so poll the run's status. Each ``flwr ls``
        is a fresh Python process (1-3 s of CPU on a busy box), so while ``done_file`` (written by
        the ServerApp at its end) is missing we ask only every 10 s, to catch a failed run.
        """
        t_end = time.monotonic() + timeout
        status, last_ask = "", 0.0
        while time.monotonic() < t_end:
            if done_file is None or done_file.exists() or time.monotonic() - last_ask > 10:
                last_ask = time.monotonic()
                runs = self.flwr("ls", CONNECTION, "--run-id", run_id).get("runs", [])
                status = runs[0]["status"] if runs else ""
                if status.startswith("finished"):
                    if status != "finished:completed":
                        log = subprocess.run(
                            ["flwr", "log", run_id, CONNECTION, "--show"],
                            env=self.env, capture_output=True, text=True, timeout=60,
                        ).stdout  # fmt: skip
                        why = runs[0].get("status-details")
                        raise AssertionError(f"run {run_id} {status}: {why}\n{log[-6000:]}")
                    return
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} still {status!r} after {timeout:.0f} s\n{self.logs()}")

    def stop(self) -> None:
        # SuperNodes first, then the SuperLink; SIGKILL whatever is left after 15 s.
        order = [p for p in self.procs if p[0] != "superlink"] + [
            p for p in self.procs if p[0] == "superlink"
        ]
        for _, p, _ in order:
            signal_group(p, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            signal_group(p, signal.SIGKILL)
            p.wait(timeout=15)


def signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the group we created with start_new_session (pgid == pid)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressors", default="none;mask:keep=0.125", help="specs separated by ;")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--samples-per-client", type=int, default=0, help="a seeded random n of each partition (0 = all)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for Flower state, logs, results")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    base = Path(args.out or tempfile.mkdtemp(prefix="fc-flower-"))
    base.mkdir(parents=True, exist_ok=True)
    specs = [s.strip() for s in args.compressors.split(";") if s.strip()]
    dep = Deployment(base, n_nodes=args.nodes)
    t0 = time.monotonic()
    try:
        dep.start()
        up = time.monotonic() - t0
        print(f"SuperLink on 127.0.0.1:{dep.port}, {args.nodes} SuperNodes online after {up:.1f} s")
        runs = {}
        for spec in specs:
            out = base / ("out-" + "".join(c if c.isalnum() else "_" for c in spec))
            cfg = {
                "compressor": spec,
                "num-server-rounds": args.rounds,
                "samples-per-client": args.samples_per_client,
                "torch-threads": args.torch_threads,
                "seed": args.seed,
                "min-nodes": args.nodes,
                "out-dir": str(out),
            }
            runs[spec] = (dep.submit(cfg), out)
        t_end = time.monotonic() + args.timeout
        # upstream B: payload bytes the Strategy received; flower in B: the bytes Flower itself
        # counted arriving at the SuperLink for the run (payloads + message overhead).
        head = ("compressor", "upstream B", "dense B", "ratio", "flower in B", "accuracy", "run s")
        print("{:<42} {:>11} {:>11} {:>7} {:>11} {:>8} {:>6}".format(*head))
        for spec, (run_id, out) in runs.items():
            dep.wait_run(run_id, max(1.0, t_end - time.monotonic()), out / "final_weights.fcmp")
            m = json.loads((out / "metrics.json").read_text())
            info = dep.flwr("ls", CONNECTION, "--run-id", run_id)["runs"][0]
            inbound = info.get("network-traffic", {}).get("inbound-bytes", -1)
            ratio = m["dense_upstream_bytes"] / m["upstream_bytes"]
            print(
                f"{spec:<42} {m['upstream_bytes']:>11} {m['dense_upstream_bytes']:>11} {ratio:>7.2f} "
                f"{inbound:>11} {m['final_accuracy']:>8.4f} {float(info.get('elapsed', 'nan')):>6.1f}"
            )
    finally:
        dep.stop()
    print(f"total {time.monotonic() - t0:.1f} s; logs and results in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
