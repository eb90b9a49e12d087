"""Runs that survive faults, through a real local Ray: a worker process killed mid-unit, a driver killed mid-run.

Both must end with a ``summary.csv`` bit-identical to an undisturbed run of the same config. The config is the
smallest that still has every kind of dependency (originals that unlearning units start from, oracles), with
one model per block so that a run has enough units to be interrupted in the middle.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from raybench.cli import main
from raybench.config import build_config
from raybench.pipeline import execute
from raybench.reduce import reduce_run, write_summary

JOB = """\
n_models = 4
block_size = 1
forget_sets = ["1"]
methods = ["do_nothing", "finetune"]
chunk_size = 500
floor = false  # fewer units: these tests are about faults, not the floor

[recipe]
epochs = 3

[params.finetune]
epochs = [1]
"""
N_UNITS = 4 + 4 + 4  # originals, oracles of forget set 1, finetune blocks


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "faults.toml"
    path.write_text(JOB)
    return path


def _run(job: Path, out: Path, kill_after=None):
    plan, store, report = execute(build_config(str(job), out=str(out)), kill_after=kill_after)
    write_summary(store, reduce_run(store))
    return plan, report


@pytest.fixture(scope="module")
def reference(ray_session, job, tmp_path_factory) -> bytes:
    """summary.csv of an undisturbed run."""
    out = tmp_path_factory.mktemp("reference")
    plan, report = _run(job, out)
    assert len(plan.units) == N_UNITS and report.units_run == N_UNITS and report.units_retried == 0
    return (out / "summary.csv").read_bytes()


def test_a_worker_killed_mid_unit_is_replaced_and_the_summary_is_unchanged(reference, job, tmp_path):
    config = build_config(str(job), out=str(tmp_path))
    from raybench.data import load_dataset
    from raybench.pipeline import plan_run

    plan = plan_run(config, load_dataset(config.dataset))
    victim = plan.units_of("train")[0]  # an original: its checkpoint is written, then its worker dies
    assert victim.role == "original"
    asked = []  # the hook is asked about first attempts only: the victim's retry must live
    _, report = _run(job, tmp_path, kill_after=lambda unit: asked.append(unit.id) or unit.id == victim.id)
    assert sorted(asked) == sorted(u.id for u in plan.units)
    assert report.units_retried >= 1  # the victim (and any call queued on the same worker) ran again
    assert report.units_run == N_UNITS and not report.failed
    assert (tmp_path / "summary.csv").read_bytes() == reference
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def _session_processes(sid: int) -> list[int]:
    """Every process of session ``sid``: the driver and the local Ray it started (GCS, raylet, workers, agents
    all stay in the driver's session, though workers get their own process groups)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) != sid:
                    continue
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
            if state not in ("Z", "X"):  # a dead process not yet reaped by init holds nothing
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL the whole session at once (a driver killed with its local Ray); return what is still alive."""
    deadline = time.monotonic() + timeout
    while (alive := _session_processes(sid)) and time.monotonic() < deadline:
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return _session_processes(sid)


@pytest.fixture
def driver(job, tmp_path):
    """``python -m raybench run`` in its own session with its own local Ray; killed and checked at teardown."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds the killed driver's processes through /proc (Linux)")
    ray_tmp = tempfile.mkdtemp(prefix="rbt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "run"
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "raybench", "run", "--config", str(job), "--out", str(out),
                             "--num-cpus", "2"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    yield proc, out, tmp_path / "driver.log"
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()
    left = _kill_session(proc.pid)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the killed driver's Ray survived: {left}"


def test_a_killed_driver_resumes_and_the_summary_is_unchanged(reference, job, driver):
    proc, out, log = driver
    manifests = out / "manifests"
    deadline = time.monotonic() + 300
    while not (manifests.exists() and any(manifests.glob("*.json"))):
        assert proc.poll() is None, f"driver exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no unit committed in time:\n{log.read_text()}"
        time.sleep(0.02)
    left = _kill_session(proc.pid)  # SIGKILL: no cleanup code of ours or Ray's runs
    assert not left
    committed = len(list(manifests.glob("*.json")))
    assert 0 < committed < N_UNITS, "the driver must die mid-run for this test to mean anything"
    assert not (out / "summary.csv").exists()

    result = CliRunner().invoke(main, ["run", "--config", str(job), "--out", str(out)])  # the session's Ray
    assert result.exit_code == 0, result.output
    assert f"{committed} of {N_UNITS} units" in result.output and "already complete, skipped" in result.output
    assert f"{N_UNITS - committed} units run, {committed} already complete" in result.output
    assert (out / "summary.csv").read_bytes() == reference
    assert not [p for p in (out / "staging").rglob("*") if p.is_file()]  # the dead driver's wave was cleaned up
