"""Exports of stored identifications: CSV, Parquet, Darwin Core and EcoTaxa TSV.

The field mapping of each format is documented in docs/collect.md. Every export reads
the store in chunks (constant memory however large the table) and writes to a
temporary file renamed into place, so a failed export never leaves half a file
under the name a script or a GBIF upload will pick up.

One module per format (``csvfile.py``, ``parquet.py``, ``darwincore.py``,
``ecotaxa.py``) declares its writer and registers it in ``registry.py``, the one list
of format names (:data:`FORMATS`, the command line's choices).

* **CSV**: one row per identification, every column of the store (``top_k`` as
  JSON); round-trips through :func:`read_csv`.
* **Parquet** (pyarrow): the same columns with their types; ``top_k`` as a list of
  ``{label, score}`` structs and times as UTC timestamps.
* **Darwin Core**: occurrence records (``basisOfRecord`` ``MachineObservation``) of
  the identifications with a label (status ``ok``). An uncertain or rejected capture
  names no taxon, so it is no occurrence; those are counted and left out. With an
  ``.zip`` output it is a Darwin Core Archive (``occurrence.txt`` plus ``meta.xml``).
* **EcoTaxa**: the TSV EcoTaxa imports — a header line, then a line of types
  (``[t]`` text, ``[f]`` number), one object per line; as a ``.zip`` with the images.
  Labelled identifications are ``predicted`` in their category, reviewed ones
  ``validated``; uncertain and rejected ones nobody reviewed are left unclassified.

Darwin Core and EcoTaxa name taxa from ``--taxa`` and read the latest reviews
(``taxonomy.py``); Darwin Core's EML is ``eml.py``.
"""

from __future__ import annotations

from fieldscope.collect.export.base import (
    CSV_COLUMNS,
    ExportError,
    ExportFormat,
    ExportOptions,
    ExportSummary,
    escape_formula,
    parse_time,
    unescape_formula,
)
from fieldscope.collect.export.csvfile import read_csv
from fieldscope.collect.export.darwincore import DWC_TERMS
from fieldscope.collect.export.ecotaxa import ECOTAXA_COLUMNS
from fieldscope.collect.export.registry import EXPORTERS, FORMATS, export

__all__ = [
    "CSV_COLUMNS",
    "DWC_TERMS",
    "ECOTAXA_COLUMNS",
    "EXPORTERS",
    "FORMATS",
    "ExportError",
    "ExportFormat",
    "ExportOptions",
    "ExportSummary",
    "escape_formula",
    "export",
    "parse_time",
    "read_csv",
    "unescape_formula",
]
