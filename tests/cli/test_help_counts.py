"""Numbers the help texts state agree with the code they describe."""

import inspect
import re
import typing

from estimator.cli.plan import plan
from estimator.cli.validate import SuiteOpt
from estimator.request import PLAN_DEFAULTS, SETUP_DEFAULTS
from estimator.validation_suites import fixed_suite


def test_validate_help_counts_the_suites() -> None:
    text = typing.get_args(SuiteOpt)[1].help
    quick = int(re.search(r"quick: (\d+) small runs", text).group(1))
    full = int(re.search(r"full: (\d+) runs", text).group(1))
    assert (quick, full) == (len(fixed_suite("quick")), len(fixed_suite("full")))


def test_plan_defaults_are_request_plan_defaults() -> None:
    """One place for plan's defaults (request.PLAN_DEFAULTS says why seq_len differs from
    estimate's SETUP_DEFAULTS); the other setup flags share estimate's defaults."""
    defaults = {name: p.default for name, p in inspect.signature(plan).parameters.items()}
    assert defaults["seq_len"] == PLAN_DEFAULTS["seq_len"] != SETUP_DEFAULTS["seq_len"]
    assert defaults["global_batch"] == PLAN_DEFAULTS["global_batch"]
    for name in ("lora_rank", "lora_alpha", "lora_targets", "num_devices", "offload"):
        assert defaults[name] == SETUP_DEFAULTS[name], name
    assert defaults["nodes"] == SETUP_DEFAULTS["nodes"]
