"""The `nvfree` command line: thin typer commands over the library."""
