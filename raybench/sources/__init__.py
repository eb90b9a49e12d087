"""Sources of ensembles (``raybench.sources.base``): trained here, or imported from a published hub or files."""

from raybench.sources.base import Ensemble, Source, SourceError, write_import_unit

__all__ = ["Ensemble", "Source", "SourceError", "write_import_unit"]
