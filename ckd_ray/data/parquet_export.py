"""Converts LLaVA JSON/JSONL records and their images into Parquet files of the layout
`ckd_ray.data.llava_parquet` defines, reading them through the pipeline's planned reads
(`ckd_ray.data.sources`)."""

from __future__ import annotations

from dataclasses import dataclass

from ckd_ray import storage
from ckd_ray.data.config import SourceConfig
from ckd_ray.data.llava_parquet import UnrepresentableRecord, parquet_schema, record_to_row
from ckd_ray.data.rejects import Reject, RejectsLog
from ckd_ray.data.sources import catalog_source, plan_reads, read_task_rows


@dataclass(frozen=True)
class ParquetExport:
    """What `write_llava_parquet` wrote."""

    uri: str
    num_rows: int
    num_files: int
    num_rejected: int
    rejects_uri: str


def write_llava_parquet(
    json_uri: str,
    image_root: str,
    out_uri: str,
    *,
    rows_per_group: int = 1024,
    rows_per_file: int = 65536,
    rejects_uri: str | None = None,
) -> ParquetExport:
    """Converts a LLaVA JSON/JSONL file and its images (folder or .zip; local or s3://) into Parquet
    files `part-00000.parquet`, ... under `out_uri`, image bytes inline, record order kept. Streams:
    one row group in memory at a time. Records the schema cannot hold go to `rejects_uri` (default
    `<out_uri>/_rejects.jsonl`, a name Parquet readers skip) with their reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rejects_uri = rejects_uri or storage.join(out_uri, "_rejects.jsonl")
    source = SourceConfig(uri=json_uri, image_root=image_root)
    plan = plan_reads([catalog_source(source)], hops=None, mix=False, seed=0, records_per_task=rows_per_group)
    log = RejectsLog(rejects_uri, plan.num_records, max_fraction=1.0)
    fs, out_path = storage.arrow_filesystem(out_uri)
    schema = parquet_schema()
    writer, num_files, rows_in_file, num_rows = None, 0, 0, 0
    try:
        for task in plan.tasks:
            read = read_task_rows(task).to_pydict()
            rows, rejects = [], []
            # A missing image is written as a null `image`: reading the Parquet back rejects it then.
            for ordinal, raw, image in zip(read["ordinal"], read["record"], read["image"]):
                try:
                    rows.append(record_to_row(raw, image))
                except UnrepresentableRecord as err:
                    rejects.append(Reject.of(source.label, ordinal, None, err.reason, err.detail, raw))
            log.add(rejects)
            if not rows:
                continue
            if writer is None or rows_in_file >= rows_per_file:
                if writer is not None:
                    writer.close()
                fs.create_dir(out_path, recursive=True)
                writer = pq.ParquetWriter(f"{out_path}/part-{num_files:05d}.parquet", schema, filesystem=fs)
                num_files, rows_in_file = num_files + 1, 0
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=rows_per_group)
            rows_in_file += len(rows)
            num_rows += len(rows)
    finally:
        if writer is not None:
            writer.close()
    summary = log.close()
    return ParquetExport(out_uri, num_rows, num_files, summary.num_rejected, rejects_uri)
