"""The typer app. Every user error ends as one line on stderr and exit code 2."""

import sys

import typer

from estimator.cli import (
    calibrate,
    catalog_cmds,
    compare,
    estimate,
    hardware,
    plan,
    run,
    trace,
    train,
    validate,
)

app = typer.Typer(name="nvfree", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Can I train or fine-tune this LLM on my hardware? Memory, time, cost.")
"""rich_markup_mode=None: help texts are plain text, so '[default: …]' and 'nvfree[plot]' show
as written instead of being read as rich markup."""


def _flag_type(self, ctx):
    """On/off flags show no value type (typer 0.29 prints '<bool>' for them)."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"nvfree {version('nvfree')}")
        except PackageNotFoundError:  # a source checkout without an install
            typer.echo("nvfree (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print nvfree's version and exit.")) -> None:
    """Can I train or fine-tune this LLM on my hardware? Memory, time, cost."""


estimate.register(app)
catalog_cmds.register(app)
hardware.register(app)
calibrate.register(app)
train.register(app)
compare.register(app)
plan.register(app)
run.register(app)
validate.register(app)
trace.register(app)

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, map user errors to one line + exit 2."""
    from estimator.errors import NvfreeError

    if argv is None:  # the console command (not a caller passing arguments): tcmalloc if there
        from estimator.allocator import reexec_under_tcmalloc

        reexec_under_tcmalloc(sys.argv[1:])
    debug = "--debug" in (argv if argv is not None else sys.argv)
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]
    try:
        result = app(args=args, prog_name="nvfree", standalone_mode=False)
    except NvfreeError as exc:
        if debug:
            raise
        fail(str(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("nvfree: aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # click usage errors (typer vendors click)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        fail(exc.format_message().replace("\n", " ").removeprefix("Value error, "))
    sys.exit(result if isinstance(result, int) else 0)


def fail(message: str) -> None:
    """One red line on stderr, exit code 2 (a message that quotes a user's text with line
    breaks in it is joined into one line)."""
    typer.secho(f"nvfree: error: {' '.join(message.split(chr(10)))}", err=True, fg="red")
    sys.exit(EXIT_USAGE)
