"""`ckd-ray models ...`: build model folders from public checkpoints."""

from __future__ import annotations

import sys

import click


@click.group()
def models() -> None:
    """Model folders: pretrain tiny parts, compose a LLaVA model from an LLM and a vision tower."""


@models.command("compose")
@click.option("--llm", required=True, metavar="DIR_OR_S3", help="Causal-LM folder (Qwen2/Qwen2.5; local or s3://).")
@click.option("--vision", required=True, metavar="DIR_OR_S3",
              help="SigLIP or CLIP folder, vision-only or a full image-text model (local or s3://).")
@click.option("--out", required=True, metavar="DIR_OR_S3", help="New Llava folder (local or s3://); must not exist or be empty.")
@click.option("--connector", type=click.Choice(["mlp2x_gelu"]), default="mlp2x_gelu", show_default=True,
              help="Connector: TinyLLaVA's 2-layer MLP with GELU, freshly initialised.")
@click.option("--vision-feature-layer", type=int, default=-2, show_default=True,
              help="Vision tower layer that feeds the connector (-2: second to last, as LLaVA-1.5 and TinyLLaVA).")
@click.option("--select-strategy", type=click.Choice(["default", "full"]), default=None,
              help="default drops the first visual token (CLIP's class token), full keeps all; "
                   "unset: default for CLIP, full for SigLIP.")
def compose(llm, vision, out, connector, vision_feature_layer, select_strategy) -> None:
    """Compose a Hugging Face Llava folder from --llm and --vision with a fresh connector; it
    loads with transformers alone (AutoProcessor, LlavaForConditionalGeneration). Train the
    connector (PT) before use: as a cascade role, cascade.prepare_teachers does."""
    from ckd_ray.models.compose import ComposeError, ComposeSpec, compose_model

    spec = ComposeSpec(llm=llm, vision=vision, out=out, connector=connector,
                       vision_feature_layer=vision_feature_layer, select_strategy=select_strategy)
    try:
        composed = compose_model(spec)
    except (ComposeError, FileNotFoundError) as err:
        click.echo(str(err), err=True)
        sys.exit(2)
    click.echo(composed.summary())


@models.command("pretrain")
@click.argument("benchmark_root")
@click.option("--out", default="models/parts", show_default=True, metavar="DIR",
              help="Folder of the parts, each in a subfolder named by its content digest (reused when there).")
@click.option("--compose", "compose_into", default="models/tiny", show_default=True, metavar="DIR",
              help="Compose the Llava folders DIR/student, DIR/ta, DIR/teacher from the parts ('' to skip).")
@click.option("--vision-steps", default=400, show_default=True, help="Optimizer steps of the vision tower.")
@click.option("--llm-steps", default=150, show_default=True, help="Optimizer steps of each LLM (the same for every size).")
def pretrain(benchmark_root, out, compose_into, vision_steps, llm_steps) -> None:
    """Pretrain tiny parts on BENCHMARK_ROOT's training split, offline on CPU: a SigLIP vision tower
    that names digits and ink colours, and a Qwen2 LLM per size (student, TA, teacher) trained on the
    benchmark's text; then compose them into Llava folders, as public Qwen2.5 + SigLIP are composed."""
    from ckd_ray.models.pretrain import LanguageRecipe, VisionRecipe, pretrain_parts

    parts = pretrain_parts(benchmark_root, out, vision=VisionRecipe(steps=vision_steps), language=LanguageRecipe(steps=llm_steps),
                           compose_into=compose_into or None, log=lambda line: click.echo(line, err=True))
    click.echo(parts.summary())
