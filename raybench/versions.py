"""The software and device that produced a run's files, recorded beside them (never hashed into an identity).

A reviewer reading a number needs to know what computed it, but a torch upgrade must not orphan a run folder: so
these versions are *recorded* (run.json, each unit's manifest, summary.json) and never enter a run or unit id.
What a change of raybench's own code means for stored results is versioned separately, by the integers that do
enter unit ids (``Method.version``, ``training.TRAINING_VERSION``, ``training.MARGINS_VERSION``).

``device`` says where the numbers were computed, and so depends on the file:

* run.json: the driver's device (the CUDA device name of its GPU 0, else ``"cpu"``) when it created or last
  opened the folder;
* a unit's manifest: the device of the worker that computed it;
* summary.json: the devices of the run folder's units, from their manifests (``null`` when none recorded one,
  e.g. only imported models).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from collections.abc import Iterable

import raybench

PACKAGES = ("torch", "ray", "numpy", "pyarrow")
VERSION_KEYS = ("raybench", "python", *PACKAGES, "device")


@functools.cache
def software_versions() -> dict[str, str | None]:
    """raybench (the code running, ``raybench.__version__``), Python and the installed packages that decide the
    numbers; None for a package that is not installed. Read from package metadata: nothing is imported."""
    out: dict[str, str | None] = {"raybench": raybench.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: object = None) -> str:
    """``"cpu"``, or the CUDA device's name (e.g. ``"NVIDIA H200"``) for a CUDA device; ``device=None`` means this
    process's default: its GPU 0 if it sees one, else the CPU."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return dev.type
    return torch.cuda.get_device_name(dev)


def collect_versions(device: object = None) -> dict[str, str | None]:
    """``{"raybench", "python", "torch", "ray", "numpy", "pyarrow", "device"}`` for this process (``device`` as in
    ``device_name``)."""
    return {**software_versions(), "device": device_name(device)}


def devices_of(manifests: Iterable[dict]) -> str | None:
    """The distinct devices recorded in these unit manifests, sorted and comma-separated; None if none has one."""
    names = {m.get("versions", {}).get("device") for m in manifests}
    names.discard(None)
    return ", ".join(sorted(names)) or None


def summary_versions(manifests: Iterable[dict]) -> dict[str, str | None]:
    """summary.json's ``versions``: the software computing the summary (KLOM is computed here, not on the
    workers), and the devices the summarised margins were computed on."""
    return {**software_versions(), "device": devices_of(manifests)}
