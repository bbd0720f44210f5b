"""Exact duplicates: pairs whose image bytes have the same sha256; one copy of each is kept.

Global dedup has to see every hash at once, which for a billion-row pool is more than memory,
so it runs in DuckDB straight over the scan pass's per-shard parquet sidecars: a window over
`PARTITION BY sha256`, which DuckDB evaluates out of core (spilling to `temp_directory` under a
`memory_limit`). Only the duplicates come back to Python.

The kept copy is deterministic: the first in priority order (the shards' order as given, then
the order in the tar) among the copies that no earlier step removed, so a duplicate with a good
caption is not lost because its first copy had a boilerplate one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def find_exact_duplicates(
    sidecars: Sequence[Path], removed_before: np.ndarray, memory_limit: str = "2GB",
    temp_directory: Path | None = None,
) -> np.ndarray:
    """sidecars: the scan parquet files in pool order (their rows concatenated are the pool).
    removed_before: bool [N], rows an earlier step removed (never chosen as the kept copy, never
    reported again). -> int64 [N]: -1 for rows kept by this step, else the pool row of the copy
    kept in their place."""
    n = len(removed_before)
    result = np.full(n, -1, dtype=np.int64)
    if not sidecars:
        return result
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = false")
        if temp_directory is not None:
            con.execute(f"SET temp_directory = '{Path(temp_directory).as_posix()}'")
        files = [str(Path(p).resolve()) for p in sidecars]
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]  # footer only, no scan
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        con.register("files", pa.table({"filename": files, "offset": offsets}))
        removed_rows = np.flatnonzero(removed_before).astype(np.int64)
        con.register("removed", pa.table({"row": removed_rows}))
        duplicates = con.execute(
            """
            WITH pool AS (
                SELECT f."offset" + p.file_row_number AS row, p.sha256
                FROM read_parquet(?, filename = true, file_row_number = true) AS p
                JOIN files AS f ON p.filename = f.filename
            ), ranked AS (
                SELECT pool.row, removed.row IS NOT NULL AS gone,
                       first_value(pool.row) OVER w AS kept,
                       row_number() OVER w AS rank
                FROM pool LEFT JOIN removed ON pool.row = removed.row
                WINDOW w AS (PARTITION BY pool.sha256 ORDER BY removed.row IS NOT NULL, pool.row)
            )
            SELECT row, kept FROM ranked WHERE rank > 1 AND NOT gone
            """,
            [files],
        ).fetchnumpy()
    finally:
        con.close()
    if len(duplicates["row"]):
        result[duplicates["row"].astype(np.int64)] = duplicates["kept"].astype(np.int64)
    return result
