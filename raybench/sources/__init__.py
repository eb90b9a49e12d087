"""Sources of ensembles (the contract: ``raybench.sources.base``): trained here, or imported from a published hub.

A run config selects one with one key, ``source``: ``"trained"`` (the default), or ``"NAME"`` /
``"NAME:FOLDER_OR_REPO"`` for a published source (without a location, its hub repo). ``files`` (a user's own
margins, ``raybench.sources.files``) is scored with ``raybench score`` rather than run.
"""

from __future__ import annotations

from raybench.sources.base import Ensemble, Source, SourceError, write_import_unit

SOURCES = ("trained", "easydub", "klom-models")


def source_for(spec: str, *, cache_dir: str | None = None, variant: str | None = None) -> Source:
    """The source a ``source`` setting names (``"trained"``, ``"easydub:/data/hub"``, ``"klom-models"`` …).
    ``variant``: which of a hub's model folders (``klom-models``: ``CIFAR10``, ``CIFAR10_augmented``,
    ``LIVING17``); the others have one."""
    name, _, location = str(spec).partition(":")
    if variant is not None and name != "klom-models":
        raise SourceError(f"source {name!r} has no variants (only klom-models has), got {variant!r}")
    if name == "trained":
        if location:
            raise SourceError(f"source 'trained' takes no location, got {spec!r}")
        from raybench.sources.trained import TrainedSource

        return TrainedSource()
    if name == "easydub":
        from raybench.sources.easydub import EasydubSource

        return EasydubSource(location, cache_dir=cache_dir)
    if name == "klom-models":
        from raybench.sources.klom_models import KlomModelsSource

        return KlomModelsSource(location, cache_dir=cache_dir, variant=variant or "CIFAR10")
    raise SourceError(f"unknown source {name!r}; known: {', '.join(SOURCES)} (as NAME or NAME:FOLDER_OR_REPO)")


__all__ = ["SOURCES", "Ensemble", "Source", "SourceError", "source_for", "write_import_unit"]
