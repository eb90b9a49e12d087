"""``huggingface_hub.snapshot_download`` replaced by a copy out of a local folder in a hub's layout, recording
what was asked: the download code runs unchanged, and a test sees exactly which files it requested."""

import fnmatch
import shutil
from pathlib import Path


def fake_snapshot_download(monkeypatch, hub: Path, target: Path) -> list[dict]:
    """Patch the hub client so that downloads copy the requested files of ``hub`` into ``target``; returns the list
    every call is appended to (repo id, repo type, the allow patterns, other keyword arguments)."""
    import huggingface_hub

    calls: list[dict] = []

    def download(*, repo_id, repo_type, allow_patterns, cache_dir=None, **kwargs):
        calls.append({"repo_id": repo_id, "repo_type": repo_type, "patterns": list(allow_patterns), **kwargs})
        for path in hub.rglob("*"):
            rel = path.relative_to(hub).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / rel)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return calls
