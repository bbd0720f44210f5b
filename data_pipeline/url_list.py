"""Check a URL list before img2dataset sees it, and write the demo's URL lists.

img2dataset reports a missing file or column as a traceback, after spawning its pool; we read
the header (or the parquet schema) first and say what is wrong in one line, naming the columns
the list does have. We also count the rows, which tells how many shards a complete run has.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_pipeline.errors import UserError
from data_pipeline.shard_config import ShardConfig


@dataclass(frozen=True)
class UrlListInfo:
    files: tuple[str, ...]
    columns: tuple[str, ...]
    file_rows: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.file_rows)

    def expected_shards(self, samples_per_shard: int) -> int:
        # img2dataset numbers shards per input file, continuing the count across files.
        return sum(math.ceil(n / samples_per_shard) for n in self.file_rows)


def _compression(fmt: str) -> str | None:
    return "gzip" if fmt.endswith(".gz") else None


def _header_columns(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> tuple[str, ...]:
    base = fmt.removesuffix(".gz")
    with fs.open(path, "rb", compression=_compression(fmt)) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
        if base in ("csv", "tsv"):
            header = next(csv.reader(text, delimiter="," if base == "csv" else "\t"), [])
            return tuple(header)
        if base == "jsonl":
            for line in text:
                if line.strip():
                    record = json.loads(line)
                    return tuple(record) if isinstance(record, dict) else ()
            return ()
        # A json list is one document; img2dataset reads it whole with pandas anyway.
        records = json.load(text)
        if isinstance(records, list) and records and isinstance(records[0], dict):
            return tuple(records[0])
        if isinstance(records, dict):  # pandas' column-oriented layout {"url": {...}, ...}
            return tuple(records)
        return ()


def _count_rows(fs: fsspec.AbstractFileSystem, path: str, fmt: str, url_col: str) -> int:
    """Rows img2dataset will see: parsed with the same pyarrow/pandas readers and defaults it
    uses (a CSV with newlines inside quoted values would count differently elsewhere)."""
    base = fmt.removesuffix(".gz")
    with fs.open(path, "rb", compression=_compression(fmt)) as handle:
        if base in ("csv", "tsv"):
            table = pa_csv.read_csv(
                handle,
                parse_options=pa_csv.ParseOptions(delimiter="," if base == "csv" else "\t"),
                convert_options=pa_csv.ConvertOptions(include_columns=[url_col]),
            )
            return table.num_rows
        if base == "jsonl":
            return pa_json.read_json(handle).num_rows
        import pandas as pd  # only json lists need it (as in img2dataset); it costs 0.6 s to import

        return len(pd.read_json(handle))


def inspect_url_list(config: ShardConfig, path: str) -> UrlListInfo:
    """Raise UserError unless `path` is a readable URL list with the configured columns."""
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        raise UserError(f"no URL list at {path}")
    if fs.isdir(local):
        files = sorted(fs.glob(local.rstrip("/") + "/*." + config.input_format))
        if not files:
            raise UserError(f"{path} is a folder with no *.{config.input_format} file in it")
    else:
        files = [local]
    columns: tuple[str, ...] = ()
    file_rows: list[int] = []
    for file in files:
        try:
            if config.input_format == "parquet":
                with fs.open(file, "rb") as handle:
                    meta = pq.ParquetFile(handle).metadata
                    columns = tuple(meta.schema.to_arrow_schema().names)
                    rows = meta.num_rows
            else:
                columns = _header_columns(fs, file, config.input_format)
                rows = (
                    _count_rows(fs, file, config.input_format, config.url_col)
                    if config.url_col in columns
                    else 0
                )
        except (pa.ArrowException, ValueError, UnicodeDecodeError, OSError) as exc:
            raise UserError(f"cannot read {file} as {config.input_format}: {exc}") from exc
        file_rows.append(rows)
        wanted = [config.url_col, config.caption_col, *config.extra_columns]
        missing = [c for c in wanted if c not in columns]
        if missing:
            has = ", ".join(columns) if columns else "none"
            hint = (
                " (choose them with --url-col / --caption-col)"
                if set(missing) & {config.url_col, config.caption_col}
                else ""
            )
            raise UserError(
                f"URL list {file} has no column {', '.join(missing)}{hint}; its columns are: {has}"
            )
    info = UrlListInfo(tuple(files), columns, tuple(file_rows))
    if info.rows == 0:
        raise UserError(f"URL list {path} has no rows")
    return info


def write_parquet_url_list(path: str, records: list[dict[str, object]]) -> None:
    """Write rows (dicts with the same keys) as a parquet URL list, in the given order."""
    columns = {key: [r[key] for r in records] for key in records[0]} if records else {}
    pq.write_table(pa.table(columns), path)
