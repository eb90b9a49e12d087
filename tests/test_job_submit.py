"""The cluster path of README.md, for real: ``ray job submit`` of ``python -m raybench run`` to a Ray head.

The test starts its own Ray head with the venv's ``ray`` CLI and submits ``jobs/smoke.toml`` the way README.md
tells a cluster user to (the repository as working dir, with README's excludes plus the cache folders; the
config path relative to it; an absolute ``--out``). It checks that the job exits 0, that its driver joined this
head (Ray sets ``RAY_ADDRESS`` for jobs) from the uploaded copy of the package, and that the summary is, bit for
bit, what a local run of the same config writes.

Stopping the head safely. ``ray stop`` takes no address: it kills every Ray process of the machine, including
the pytest session's own local Ray and anyone else's. So the head runs as ``ray start --block`` in a session of
its own (``start_new_session``), and it is stopped with SIGTERM to that one process: with ``--block`` Ray
registers a SIGTERM handler that kills the node's processes (raylet first, which stops its workers) and exits;
``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` skips the 30 s drain it would otherwise wait for. Everything the head
started is found through ``/proc``: the processes of its session and their descendants (the job driver and its
watcher start sessions of their own, but are children of the job supervisor), recorded while the job runs, so
one that outlives its parent is still known. Whatever of those survives the graceful stop is SIGKILLed, matched
by pid *and* start time so that a reused pid is never hit, and the test fails if anything remains. Should
pytest itself be killed, the head gets SIGTERM too (``PR_SET_PDEATHSIG``) and stops the same way.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from raybench.config import build_config
from raybench.pipeline import execute
from raybench.reduce import reduce_run, write_summary

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/smoke.toml"  # relative: resolved in the uploaded working dir, as on a cluster
EXCLUDES = [".git", "runs/", ".venv/", "__pycache__/", ".pytest_cache/", ".hypothesis/", ".ruff_cache/"]
HEAD_START_S = 180  # two shared cores: a head's GCS, raylet, dashboard and agents can take a while
JOB_TIMEOUT_S = 420
STOP_GRACE_S = 60

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds the head's processes through /proc")

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot): a process, even after its pid is reused


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of ``pid`` from /proc, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _alive(proc: Proc) -> bool:
    stat = _stat(proc[0])
    return stat is not None and stat[3] == proc[1] and stat[0] not in ("Z", "X")  # a zombie holds nothing


def _session_tree(sid: int) -> set[Proc]:
    """The live processes of session ``sid`` and all their descendants, whatever session those are in."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] not in ("Z", "X"):
            table[int(entry.name)] = stat
    found = {pid for pid, (_, _, session, _) in table.items() if session == sid}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (_, ppid, _, _) in table.items() if ppid in frontier and pid not in found}
        found |= frontier
    return {(pid, table[pid][3]) for pid in found}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all held open together, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _terminate_with_parent() -> None:
    """In the head's process before exec: SIGTERM it when pytest dies, so that a killed test run (a CI timeout)
    still stops the head through Ray's own handler instead of leaving a cluster behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RayHead:
    """One Ray head of this test: its own ports, temp dir and session; ``stop`` ends exactly what it started."""

    def __init__(self, log_path: Path) -> None:
        ray_cli = Path(sys.executable).parent / "ray"
        if not ray_cli.exists():
            pytest.fail(f"no `ray` CLI next to {sys.executable}: ray[default] is not installed in this venv")
        gcs, self.dashboard_port, agent, client = _free_ports(4)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Short: Ray's Unix socket paths live under it and must stay within ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        # The job's `python` is this venv's, as on a cluster whose nodes have raybench's dependencies installed.
        self.env["PATH"] = f"{ray_cli.parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.ray_cli = str(ray_cli)
        self.log_path = log_path
        self._log = log_path.open("w")
        self.seen: set[Proc] = set()
        self.proc = subprocess.Popen(
            [self.ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             f"--temp-dir={self.temp_dir}"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_terminate_with_parent)

    def wait_ready(self) -> None:
        """Until the job server answers; fails the test (never skips) if the head does not come up."""
        deadline = time.monotonic() + HEAD_START_S
        while True:
            self.record()
            if self.proc.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head's job server did not answer within {HEAD_START_S} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def record(self) -> None:
        """Note every process the head has started so far (polled while the job runs)."""
        if self.proc.poll() is None:
            self.seen |= _session_tree(self.proc.pid)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> list[str]:
        """SIGTERM the head (Ray's own handler stops the node), then SIGKILL what of its processes is left;
        return the command lines of any that are still alive after that (there should be none)."""
        self.record()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while any(_alive(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        for attempt in range(50):
            left = [p for p in self.seen if _alive(p)]
            if not left:
                break
            for pid, _ in left:
                if attempt == 0:
                    print(f"SIGKILL after graceful stop: {pid} {_cmdline(pid)}", file=sys.stderr)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [f"{pid} {_cmdline(pid)}" for pid, start in self.seen if _alive((pid, start))]


@pytest.fixture
def ray_head(tmp_path):
    """A started head, always stopped (and checked) afterwards, whether or not the test passed."""
    head = RayHead(tmp_path / "head.log")
    try:
        head.wait_ready()
        yield head
    finally:
        left = head.stop()
    assert not left, f"processes of the test's Ray head survived its stop: {left}"


def _submit(head: RayHead, out: Path, log_path: Path) -> int:
    """README.md's cluster command against ``head``; polls the head's processes until the job ends."""
    command = [head.ray_cli, "job", "submit", "--address", head.address, "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
               "--", "python", "-m", "raybench", "run", "--config", JOB, "--out", str(out)]
    with log_path.open("w") as log:
        job = subprocess.Popen(command, env=head.env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while job.poll() is None:
            head.record()
            if time.monotonic() > deadline:
                job.kill()
                job.wait()
                pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
    return job.returncode


def test_ray_job_submit_runs_raybench_on_a_cluster(ray_head, ray_session, tmp_path):
    out = tmp_path / "shared" / "smoke"  # absolute, as the driver in the cluster requires
    out.parent.mkdir()
    log_path = tmp_path / "job.log"
    rc = _submit(ray_head, out, log_path)
    log = log_path.read_text(errors="replace")
    assert rc == 0, f"`ray job submit` exited with {rc}:\n{log[-6000:]}"
    assert "succeeded" in log, log[-6000:]
    # The driver joined this head (RAY_ADDRESS) rather than starting a Ray of its own: the head knows its driver.
    with urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=30) as reply:
        jobs = [j for j in json.load(reply) if j["type"] == "SUBMISSION"]
    assert len(jobs) == 1 and jobs[0]["status"] == "SUCCEEDED", jobs
    assert jobs[0]["driver_info"] and jobs[0]["job_id"], jobs
    # The job ran in the uploaded copy (its cwd, and first on its PYTHONPATH): complete, and without the excludes.
    unpacked = Path(ray_head.temp_dir).glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
    packages = [p for p in unpacked if p.is_dir()]
    assert len(packages) == 1, packages
    uploaded = {p.relative_to(packages[0]).as_posix() for p in packages[0].rglob("*")}
    assert {"raybench/__main__.py", JOB} <= uploaded
    parts = {part for name in uploaded for part in name.split("/")}
    assert not parts & {".git", ".venv", "runs", ".pytest_cache", ".hypothesis", ".ruff_cache"}, sorted(parts)
    # (__pycache__ folders are there: the job's own imports write them into the unpacked copy.)

    with (out / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    keys = sorted((r["forget_set"], r["method"], r["epoch"], r["split"]) for r in rows)
    # oracle_floor: on by default, its epoch the recipe's (digits trains 14)
    assert keys == sorted(("1", m, e, s) for m, e in (("do_nothing", "0"), ("oracle_floor", "14"), ("finetune", "1"))
                          for s in ("retain", "forget", "val"))
    n_samples = {"retain": 1437 - 10, "forget": 10, "val": 360}
    for r in rows:
        assert (int(r["n_models"]), int(r["n_oracles"])) == (4, 4)
        assert int(r["n_samples"]) == n_samples[r["split"]]
        assert 0 <= float(r["klom_p5"]) <= float(r["klom_p50"]) <= float(r["klom_p95"]) <= 11.6
        assert 0.5 < float(r["accuracy"]) <= 1.0 and 0.5 < float(r["oracle_accuracy"]) <= 1.0

    # The same config run here, on the pytest session's local Ray, writes the same summary: the cluster path
    # computes what the laptop path does (same config file, same package, deterministic units).
    local = tmp_path / "local"
    _, store, _ = execute(build_config(str(ROOT / JOB), out=str(local)))
    write_summary(store, reduce_run(store))
    assert (out / "summary.csv").read_bytes() == (local / "summary.csv").read_bytes()
