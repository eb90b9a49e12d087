"""A damaged, edited or busy run folder never yields numbers, and never a traceback: every command refuses with
exit code 2 and one line saying what is wrong and what to do, and leaves the folder's earlier results as they were.

One small real run (digits, 4 models in blocks of 2, forget sets 1 and 3, do_nothing) is made once; each test
damages a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raybench.cli import main
from raybench.ids import digest
from raybench.reduce import reduce_run, write_summary
from raybench.store import LOCK_FILE, RunStore, StoreError

JOB = """\
n_models = 4
block_size = 2
forget_sets = ["1", "3"]
methods = ["do_nothing"]
chunk_size = 500

[recipe]
epochs = 2
"""


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(result, *needles: str) -> str:
    """Exit code 2 and one error line (click's usage lines aside), no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (the lock file aside: a run that takes the lock writes its own pid there)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "small.toml"
    path.write_text(JOB)
    return path


@pytest.fixture(scope="module")
def base(ray_session, job, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    result = _cli("run", "--config", job, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A fresh copy of the small run, to damage."""
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def _units(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "manifests").glob("*.json")}


def _unit_of(out: Path, role: str, forget_set: str | None = None) -> dict:
    return next(m for m in sorted(_units(out).values(), key=lambda m: m["unit"])
                if m["role"] == role and forget_set in (None, m["forget_set"]))


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# -- what a commit records --------------------------------------------------------------------------------------------
def test_manifests_record_each_files_size_and_sha256_and_the_forget_set_digest(base):
    units = _units(base)
    assert len(units) == 2 + 2 * 2 + 2 * 2  # two blocks of originals; of oracles and of floor oracles per forget set
    for meta in units.values():
        for file, size, sha in zip(meta["files"], meta["file_sizes"], meta["file_sha256"], strict=True):
            data = (base / file).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)
        if meta["forget_set"] == "none":
            assert "forget_set_digest" not in meta
        else:
            indices = json.loads((base / "forget_sets" / f"{meta['forget_set']}.json").read_text())["indices"]
            assert meta["forget_set_digest"] == digest([int(i) for i in indices])


# -- damaged Parquet --------------------------------------------------------------------------------------------------
def test_flipped_bytes_are_refused_and_deleting_the_manifest_recomputes_the_unit(run, job):
    """The reproduced bug: 64 flipped bytes changed do_nothing's KLOM silently. Now reduce and run refuse, naming
    the file and the manifest to delete; after deleting it, the next run recomputes the unit, bit for bit."""
    before = (run / "summary.csv").read_bytes()
    meta = _unit_of(run, "original")
    damaged = run / meta["files"][0]
    _flip(damaged, damaged.stat().st_size // 2)
    snapshot = _snapshot(run)
    line = _refused(_cli("reduce", run), meta["files"][0], f"manifests/{meta['unit']}.json", "sha256")
    assert "Delete" in line
    _refused(_cli("run", "--config", job, "--out", run), f"manifests/{meta['unit']}.json")
    assert _snapshot(run) == snapshot

    (run / "manifests" / f"{meta['unit']}.json").unlink()
    again = _cli("run", "--config", job, "--out", run)
    assert again.exit_code == 0, again.output
    assert "1 units run" in again.output
    assert (run / "summary.csv").read_bytes() == before


def test_parquet_pages_carry_checksums_that_every_read_verifies(run):
    """Past the manifest's digest, a damaged data page of a file written by Ray Data fails its CRC when read."""
    meta = _unit_of(run, "oracle", "1")
    path = run / meta["files"][0]
    group = pq.ParquetFile(path).metadata.row_group(0)  # train chunk 0, read below
    column = next(group.column(i) for i in range(group.num_columns)
                  if group.column(i).path_in_schema.startswith("margins"))
    _flip(path, column.data_page_offset + column.total_compressed_size // 2, 16)  # inside the page's data
    store = RunStore(str(run))
    with pytest.raises(StoreError, match="(?i)checksum") as err:
        store.read_margin_files(meta["files"], split="train", chunk=0)
    assert meta["files"][0] in str(err.value) and f"manifests/{meta['unit']}.json" in str(err.value)


def test_a_truncated_parquet_file_is_refused(run):
    meta = _unit_of(run, "oracle", "3")
    path = run / meta["files"][0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    snapshot = _snapshot(run)
    _refused(_cli("reduce", run), meta["files"][0], f"bytes where its manifest records {meta['file_sizes'][0]}")
    assert _snapshot(run) == snapshot


def test_a_damaged_checkpoint_is_refused(run):
    meta = _unit_of(run, "original")
    store = RunStore(str(run))
    assert store.read_checkpoint(meta["unit"])["seeds"] == meta["seeds"]
    path = run / "checkpoints" / f"{meta['unit']}.pt"
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(StoreError, match="damaged") as err:
        store.read_checkpoint(meta["unit"])
    assert f"manifests/{meta['unit']}.json" in str(err.value)


# -- edited records -------------------------------------------------------------------------------------------------
def test_a_replaced_forget_set_record_is_refused(run):
    record = run / "forget_sets" / "1.json"
    data = json.loads(record.read_text())
    data["indices"] = sorted(set(range(20)) - set(data["indices"]))[: len(data["indices"])]
    record.write_text(json.dumps(data))
    snapshot = _snapshot(run)
    _refused(_cli("reduce", run), "forget_sets/1.json", "other indices")
    assert _snapshot(run) == snapshot


@pytest.mark.parametrize("name", ["manifest", "dataset.json", "run.json", "forget_sets/1.json"])
@pytest.mark.parametrize("content", ["{}", "[]", '{"unit": 3}'])
def test_valid_json_that_is_not_what_was_written_is_refused(run, name, content):
    path = run / (f"manifests/{_unit_of(run, 'oracle', '1')['unit']}.json" if name == "manifest" else name)
    path.write_text(content)
    snapshot = _snapshot(run)
    _refused(_cli("reduce", run), path.name)
    assert _snapshot(run) == snapshot


def test_a_run_over_an_invalid_manifest_is_refused(run, job):
    path = run / "manifests" / f"{_unit_of(run, 'original')['unit']}.json"
    path.write_text("{}")
    snapshot = _snapshot(run)
    _refused(_cli("run", "--config", job, "--out", run), path.name, "delete it")
    assert _snapshot(run) == snapshot


@pytest.mark.parametrize("content", ["{}", '{"run": "x", "klom_version": "v", "rows": [{}]}', "[1]"])
def test_report_of_an_invalid_summary_json_is_refused(run, content):
    (run / "summary.json").write_text(content)
    (run / "report.html").unlink()
    _refused(_cli("report", run), "summary")
    assert not (run / "report.html").exists()


# -- a summary never loses ensembles ----------------------------------------------------------------------------------
def test_reduce_missing_an_oracle_manifest_keeps_the_summary(run):
    meta = _unit_of(run, "oracle", "3")
    (run / "manifests" / f"{meta['unit']}.json").unlink()
    snapshot = _snapshot(run)
    _refused(_cli("reduce", run), "do_nothing {} on forget set 3", "oracles of forget set 3: 2 of 4 models stored",
             "delete summary.csv")
    assert _snapshot(run) == snapshot


def test_reduce_of_an_interrupted_import_writes_no_empty_summary(run):
    """As an import cut short before any oracle was committed: nothing can be scored, and nothing is written."""
    for meta in _units(run).values():
        if meta["role"] == "oracle":
            (run / "manifests" / f"{meta['unit']}.json").unlink()
    for name in ("summary.csv", "summary.json"):
        (run / name).unlink()
    snapshot = _snapshot(run)
    _refused(_cli("reduce", run), "nothing to summarize", "oracles of forget set 1: none stored")
    assert _snapshot(run) == snapshot


def test_write_summary_refuses_rows_lacking_an_ensemble_of_the_summary(run):
    store = RunStore(str(run))
    rows = reduce_run(store)
    before = (run / "summary.csv").read_bytes()
    with pytest.raises(StoreError, match="on forget set 1"):
        write_summary(store, [r for r in rows if r["forget_set"] != "1"])
    with pytest.raises(StoreError, match="nothing to summarize"):
        write_summary(store, [])
    assert (run / "summary.csv").read_bytes() == before
    write_summary(store, rows)  # the same ensembles: written
    assert (run / "summary.csv").read_bytes() == before


# -- paths: nothing created by readers, nothing left by refused runs --------------------------------------------------
@pytest.mark.parametrize("command", ["reduce", "report"])
def test_read_only_commands_do_not_create_the_folder(tmp_path, command):
    missing = tmp_path / "no" / "such"
    _refused(_cli(command, missing), "does not exist")
    assert not (tmp_path / "no").exists()


def test_a_path_naming_a_file_is_refused_by_every_command(tmp_path, job):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    for args in (["run", "--config", job, "--out", path], ["reduce", path], ["report", path],
                 ["import-easydub", "--source", tmp_path, "--forget-sets", "2", "--out", path]):
        _refused(_cli(*args), "is a file")
    assert path.read_text() == "mine"


def test_a_refused_run_leaves_no_folder_behind(ray_session, tmp_path, job):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([0, 5, 5000]))
    out = tmp_path / "new" / "run"
    _refused(_cli("run", "--config", job, "--forget-sets", bad, "--out", out), "out of range")
    assert not (tmp_path / "new").exists()
    unlearn = ["--methods", "do_nothing,finetune", "--param", "finetune.epochs=1"]
    _refused(_cli("unlearn", "--config", job, *unlearn, "--out", out), "raybench train")  # after run.json is written
    assert not (tmp_path / "new").exists()


# -- the lock ------------------------------------------------------------------------------------------------------
HOLD = """\
import sys, time
from raybench.store import RunStore
with RunStore(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_locked_folder_is_refused_and_a_killed_holder_blocks_nothing(run, job):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        snapshot = _snapshot(run)
        _refused(_cli("run", "--config", job, "--out", run), str(run), "in use by another raybench run",
                 f"pid {holder.pid}")
        _refused(_cli("import-easydub", "--source", run, "--forget-sets", "2", "--out", run), "in use")
        assert _snapshot(run) == snapshot
        assert _cli("reduce", run).exit_code == 0  # reading (and rewriting the same summary) needs no lock
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the lock
        holder.wait()
    again = _cli("run", "--config", job, "--out", run)
    assert again.exit_code == 0 and "already complete" in again.output, again.output


DIE_HOLDING = """\
import os, sys, time
from raybench.store import RunStore
with RunStore(sys.argv[1]).lock():
    if os.fork() == 0:  # keeps the locked file open a moment after its owner died, as a killed run's exiting threads do
        time.sleep(1.5)
        os._exit(0)
    print("locked", flush=True)
    os._exit(0)
"""


def test_a_run_waits_for_the_lock_of_a_run_that_died_on_this_host(run, job):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    owner = subprocess.Popen([sys.executable, "-c", DIE_HOLDING, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert owner.stdout.readline().strip() == "locked"
    owner.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == owner.pid
    again = _cli("run", "--config", job, "--out", run)
    assert again.exit_code == 0 and "already complete" in again.output, again.output


def test_the_lock_on_other_filesystems_is_a_file_naming_its_owner():
    store = RunStore("runs/locked", filesystem=pafs._MockFileSystem())
    path = store.path(LOCK_FILE)
    with store.lock():
        owner = store.read_json(path)
        assert owner["pid"] == os.getpid()
        with pytest.raises(StoreError, match=f"in use by another raybench run \\(pid {os.getpid()} .*delete"):
            with store.lock():
                pass
    assert not store.exists(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store.write_json(path, {**owner, "pid": int(dead.stdout)})  # left by a run that died on this host
    with store.lock():
        assert store.read_json(path)["pid"] == os.getpid()
    store.write_json(path, {**owner, "host": "elsewhere"})  # another host: cannot tell, refused
    with pytest.raises(StoreError, match="host elsewhere"):
        with store.lock():
            pass
