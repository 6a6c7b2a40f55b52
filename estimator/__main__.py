"""`python -m estimator` = `nvfree`."""

from estimator.cli.app import main

main()
