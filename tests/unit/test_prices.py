"""Prices from data/prices.toml (issue 17, item 4): rent list prices, amortised purchases,
--price overrides, n/a (never $0) where nothing was read."""

import pytest

from estimator.catalog import load_device, priced
from estimator.catalog.prices import HOURS_PER_YEAR, PriceRule, amortised_price
from estimator.errors import SetupError
from estimator.planner.compare import compare_request


def test_rented_devices_get_the_lowest_on_demand_quote() -> None:
    assert load_device("tpu-v5p").price_per_hour_usd == pytest.approx(4.2)
    assert "on-demand" in load_device("tpu-v5e").price_source


def test_bought_hardware_is_amortised_plus_energy() -> None:
    quote = {"kind": "buy", "usd": 599, "watts": 304, "source": "s"}
    price = amortised_price([quote], PriceRule(amortise_years=2, usd_per_kwh=0.3))
    assert price.usd_per_hour == pytest.approx(599 / (2 * HOURS_PER_YEAR) + 0.304 * 0.3)
    assert load_device("rx-9070-xt").price_source.startswith("bought")


def test_unknown_price_stays_unknown_and_override_wins() -> None:
    gaudi = load_device("gaudi3")
    assert gaudi.price_per_hour_usd is None
    assert priced(gaudi, 3.0).price_per_hour_usd == 3.0


def test_compare_price_flag_and_na() -> None:
    result = compare_request("llama-3.1-8b", method="qlora", tokens=1e7,
                             devices=["gaudi3", "mi210"], prices={"gaudi3": 3.0})
    by = {o.device: o for o in result.options}
    assert by["gaudi3"].cost_usd > 0 and by["mi210"].cost_usd is None
    with pytest.raises(SetupError):
        compare_request("llama-3.1-8b", devices=["gaudi3"], link_gbit_per_second=-1.0)
