"""Rows of a Parquet file (Hugging Face datasets' format), streamed a row group at a time.

Needs ``pyarrow``. A row is a dict of its columns; images embedded by ``datasets`` arrive as
``{"bytes": ..., "path": ...}`` (an ``image`` column, or an ``images`` list of them) and are read
by the chat formats like any other image reference. Labels are row numbers over the whole file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_engine.items import Item


class ParquetRows:
    """Iterate ``(label, row)`` over a Parquet file; :attr:`rows_read` of :attr:`num_rows`."""

    def __init__(self, path: Path, batch_rows: int = 256) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a non-Parquet file
            raise ValueError(f"{self.path}: not a readable Parquet file: {e}") from None
        self.num_rows = self._file.metadata.num_rows
        self.columns = list(self._file.schema_arrow.names)
        self.batch_rows = batch_rows
        self.rows_read = 0

    def __iter__(self) -> Iterator[Item]:
        # Row group by row group, a batch of rows at a time: memory is one batch, not the file.
        for group in range(self._file.num_row_groups):
            for batch in self._file.iter_batches(batch_size=self.batch_rows, row_groups=[group]):
                for row in batch.to_pylist():
                    label = str(self.rows_read)
                    self.rows_read += 1
                    yield label, row
