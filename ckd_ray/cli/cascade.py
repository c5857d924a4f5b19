"""`ckd-ray cascade` and `ckd-ray eval`."""

from __future__ import annotations

import json

import click

from ckd_ray.cli.options import config_options, load_or_exit, verbose_option


@click.command()
@config_options
@verbose_option
def cascade(config_paths, overrides, verbose) -> None:
    """Run the cascade plan of CONFIG_PATHS on Ray (a local Ray unless ray.address or
    RAY_ADDRESS names a cluster). Running it again resumes where it stopped."""
    from ckd_ray import run_cascade
    from ckd_ray.cli.console import console

    job = load_or_exit(config_paths, overrides, check_storage=True)
    with console(job, verbose=verbose) as log:
        result = run_cascade(job, log=log, log_to_driver=verbose)
        log(f"report: {result.report_uri}")
        log(f"student: {result.student_uri}")


@click.command("eval")
@config_options
@click.option("--model", "models", multiple=True, metavar="URI_OR_ROLE",
              help="Model directory (local or s3://) or a role of the run's manifest; default: every role of the manifest.")
def evaluate(config_paths, overrides, models) -> None:
    """Score models on the evaluation sets (evaluation.sources, else the benchmark's held-out
    split) beside the no-model baselines: the headline `grounded` (accuracy above question-only),
    accuracy per question type and hop level, yes/no macro-F1; parameters, latency and peak memory."""
    import sys

    from ckd_ray import storage
    from ckd_ray.cascade.runner import run_cascade
    from ckd_ray.cascade.session import open_run
    from ckd_ray.config import ConfigError
    from ckd_ray.evaluate import evaluate_models
    from ckd_ray.evaluate.scoring import baseline_scores
    from ckd_ray.report.markdown import HEADLINE_NOTE, scores_table

    job = load_or_exit(config_paths, overrides, check_storage=True)
    try:  # the evaluation sets are resolved before Ray starts: a set that selects nothing is a config problem
        session = open_run(job, run=run_cascade, log=click.echo, build_initial=False, metrics=False)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    # The run's manifest names the prepared teachers' folders (session.job is the job as the run recorded it).
    job, data, roles = session.job, session.data, session.manifest.roles
    targets = {m: roles.get(m, m) for m in models} if models else dict(roles)
    if not targets:
        raise click.UsageError("no --model given and the run has no manifest yet: run the cascade first")
    rows = data.evaluation_rows()
    scored = evaluate_models(list(targets.values()), rows, job.evaluation, use_gpu=job.trainer.use_gpu)
    results = {name: result["scores"] for name, result in zip(targets, scored)}
    baselines = baseline_scores(scored[0]["records"])
    for line in (*HEADLINE_NOTE, "", *scores_table({name: (scores, None) for name, scores in results.items()}, baselines)):
        click.echo(line)
    out = storage.join(job.run_uri, "eval.json")
    storage.write_bytes(out, json.dumps({**results, **{f"baseline: {k}": v for k, v in baselines.items()}}, indent=2).encode())
    click.echo(f"scores: {out}")


@click.command()
@click.argument("experiment_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a value of every run's config, after the row's own overrides (e.g. --set trainer.max_steps=2).")
@click.option("--seeds", default=None, metavar="0,1,2",
              help="Run these seeds instead of the file's `seeds` (e.g. --seeds 0 for a quick trial of the table).")
def experiment(experiment_path, overrides, seeds) -> None:
    """Run every plan of EXPERIMENT_PATH (kind: experiment) and write the comparison table."""
    import sys

    from ckd_ray.cascade.experiment import load_experiment, run_experiment
    from ckd_ray.config import ConfigError

    try:
        chosen = [int(x) for x in seeds.split(",")] if seeds else None
    except ValueError:
        click.echo(f"--seeds {seeds!r} is not a comma-separated list of integers: give e.g. --seeds 0,1,2", err=True)
        sys.exit(2)
    try:
        spec, base = load_experiment(experiment_path, list(overrides))
        if chosen:
            spec.seeds = chosen
        table_uri = run_experiment(spec, base, log=click.echo)  # a run's missing data: ConfigError before Ray starts
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    click.echo(f"table: {table_uri}")
