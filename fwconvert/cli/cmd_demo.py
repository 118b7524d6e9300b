"""``fwconvert demo``: build a small LLaMA checkpoint locally and take it through the whole pipeline."""
import click


@click.command()
@click.option("-o", "--out", "out", type=click.Path(), default=None, help="Folder for the demo's outputs (default: a temporary folder).")
def demo(out):
    """Run the pipeline end to end on a small LLaMA model built locally (no download, < 3 min on 2 CPU cores)."""
    from ..demo import run_demo

    for line in run_demo(out):
        click.echo(line)
