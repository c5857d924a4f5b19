"""`ckd-ray data ...`: build the bundled benchmark, convert LLaVA JSON to Parquet."""

from __future__ import annotations

import json

import click


@click.group()
def data() -> None:
    """Data sets: the bundled digits benchmark and LLaVA format conversion."""


@data.command("build-kvqa")
@click.argument("out_dir")
@click.option("--seed", default=0, show_default=True, help="Seed of every random choice (splits, questions, distractors).")
@click.option("--coverage", default=1.0, show_default=True, help="Probability that a supporting fact is retrieved.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def build_kvqa_command(out_dir: str, seed: int, coverage: float, as_json: bool) -> None:
    """Build the digits knowledge-VQA benchmark (LLaVA-1.5 format) into OUT_DIR (local or s3://)."""
    from ckd_ray.data.kvqa import build_kvqa

    try:
        summary = build_kvqa(out_dir, seed=seed, coverage=coverage, progress=lambda line: click.echo(line, err=True))
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    click.echo(json.dumps(summary.to_json(), indent=2) if as_json else summary.format())


@data.command("to-parquet")
@click.argument("json_uri")
@click.argument("image_root")
@click.argument("out_uri")
@click.option("--rows-per-group", default=1024, show_default=True, help="Rows per Parquet row group (the unit one read task reads).")
def to_parquet_command(json_uri: str, image_root: str, out_uri: str, rows_per_group: int) -> None:
    """Convert a LLaVA JSON/JSONL file and its images (folder or .zip) into Parquet with inline image bytes."""
    from ckd_ray.data.parquet_export import write_llava_parquet

    try:
        export = write_llava_parquet(json_uri, image_root, out_uri, rows_per_group=rows_per_group)
    except (ValueError, FileNotFoundError) as err:  # a JSON list cut short, a missing file: one line, no traceback
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {export.num_rows} rows in {export.num_files} file(s) to {export.uri}")
    if export.num_rejected:
        click.echo(f"{export.num_rejected} record(s) could not be converted; reasons in {export.rejects_uri}")
