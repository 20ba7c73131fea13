"""Data sources: the contract (:mod:`.base`) and the built-in layouts, one module each (found without an import
list): Dolos and deeploc's generated data (:mod:`.dolos`)."""

from deeploc.data.sources.base import SOURCES, DataSource, build_source

__all__ = ["SOURCES", "DataSource", "build_source"]
