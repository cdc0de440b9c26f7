"""The ``edgekit`` command line.

User errors print one line and exit with code 2; a step whose result fails a
check (e.g. parity) exits with 1; an interrupt exits with 130 and says how to
resume. Heavy imports happen inside commands so ``edgekit --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgekit import __version__
from edgekit.errors import EdgekitError

SET_HELP = "Override a recipe field, e.g. --set export[0].onnx.opset=18 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: compress, export, verify and benchmark models for edge devices."""


@cli.command()
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where steps and the report go (default: runs/NAME).")
@click.option("--resume", is_flag=True, help="Reuse finished steps of an earlier run of this recipe; redo the rest.")
@click.option("--force", is_flag=True, help="Discard what the run folder holds and start over.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout when done.")
def compress(recipe_file: Path, overrides: tuple[str, ...], run_dir: Path | None, resume: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Run RECIPE: load the model, compress, export, verify, benchmark, report."""
    from edgekit.pipeline import Pipeline
    from edgekit.progress import Reporter
    from edgekit.recipe import load_recipe

    if resume and force:
        raise click.UsageError("--resume and --force contradict each other; pick one")
    recipe = load_recipe(recipe_file, list(overrides))
    reporter = Reporter(quiet=quiet or as_json)
    pipeline = Pipeline(recipe, run_dir or Path("runs") / recipe.name, resume=resume, force=force, reporter=reporter)
    pipeline.prepare()
    report = pipeline.run()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))


@cli.group()
def recipe() -> None:
    """Check recipes and show the recipe reference."""


@recipe.command("validate")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def recipe_validate(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE against the schema (no model is loaded)."""
    from edgekit.recipe import load_recipe

    r = load_recipe(recipe_file, list(overrides))
    steps = ", ".join(s.name for s in r.steps()) or "no steps"
    click.echo(f"{recipe_file}: valid ({r.model.source}; {steps})")


@recipe.command("schema")
def recipe_schema() -> None:
    """Print the recipe reference (every key and pass config) as Markdown."""
    from edgekit.recipe import schema_reference

    click.echo(schema_reference())


@cli.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE", help="Size of a named dynamic dim for the MAC count, e.g. --dim seq=128 (others count as 1).")
@click.option("--quant-debug", is_flag=True, help="For a quantized step: per-layer SQNR (and sensitivity), to find the layer that hurts.")
def inspect(target: str, as_json: bool, dim_items: tuple[str, ...], quant_debug: bool) -> None:
    """Show inputs, outputs, params, MACs, ops and size of an ONNX file, a saved step/artifact folder, or zoo:NAME."""
    from edgekit.profile import format_inspect, inspect_target

    dims = {}
    for item in dim_items:
        name, _, size = item.partition("=")
        if not name or not size.isdigit():
            raise click.BadParameter(f"{item!r} must look like NAME=SIZE, e.g. seq=128", param_hint="--dim")
        dims[name] = int(size)
    if quant_debug:
        from edgekit.quant_debug import quant_debug_report

        info = quant_debug_report(target, dims)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else info["text"])
        return
    info = inspect_target(target, dims)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(format_inspect(info))


@cli.command("passes")
def list_passes() -> None:
    """List the registered passes."""
    from edgekit.passes import registry

    for name, cls in sorted(registry().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        click.echo(f"{name:24s} {cls.kind:8s} {doc[0] if doc else ''}")


@cli.command("models")
@click.argument("pattern", default="*")
def list_zoo(pattern: str) -> None:
    """List zoo models matching PATTERN (e.g. '*cnn*')."""
    from edgekit.models import list_models

    for name in list_models(pattern):
        click.echo(name)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="edgekit", standalone_mode=False)
    except EdgekitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted; rerun with --resume to continue from the last finished step", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun with --resume to continue from the last finished step", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
