"""data/prices.toml → the hourly price of one catalogue device, with the rule that gave it.

Rule (PriceRule, stated with every price):
* Rented devices: the lowest on-demand list price per device-hour among the quotes in
  data/prices.toml (terms `on-demand` and `secure`; spot, community and flex-start quotes are
  left out: they can be pre-empted or carry no SLA). Without a quote there, the on-demand price
  data/devices.toml carries.
* Bought hardware (kind `buy`, a one-off USD price): straight-line amortisation of the purchase
  over `amortise_years` of round-the-clock use, plus the energy the device draws at its quoted
  power (`watts`) at `usd_per_kwh`. The card or machine alone: the rest of a desktop PC is not
  counted.
* Nothing read: no price (None) — shown as n/a, never $0.
"""

import math
from dataclasses import dataclass
from typing import Any

from estimator.errors import SetupError
from estimator.units import SECONDS_PER_HOUR

HOURS_PER_YEAR = 8760
"""365 × 24 hours."""
AMORTISE_YEARS = 3.0
"""Useful life a purchase is spread over (years): the common 3-year depreciation of IT
equipment (e.g. AWS and Google depreciated servers over 3–4 years before 2022; an assumption,
change it with amortise_years)."""
USD_PER_KWH = 0.165
"""Electricity price (USD/kWh): the U.S. average residential price for 2024, 16.5 ¢/kWh
(U.S. EIA, Electric Power Monthly, Table 5.3); an assumption, change it with usd_per_kwh."""
RENT_TERMS = ("on-demand", "secure")
"""Quote terms that count as a list price."""


@dataclass(frozen=True)
class PriceRule:
    """How a purchase becomes an hourly price."""

    amortise_years: float = AMORTISE_YEARS
    usd_per_kwh: float = USD_PER_KWH

    def __post_init__(self) -> None:
        """Finite, amortisation over more than 0 years, a price of electricity ≥ 0."""
        if not (math.isfinite(self.amortise_years) and self.amortise_years > 0):
            raise SetupError(f"amortise_years must be a finite number > 0, got "
                             f"{self.amortise_years!r}")
        if not (math.isfinite(self.usd_per_kwh) and self.usd_per_kwh >= 0):
            raise SetupError(f"usd_per_kwh must be a finite number >= 0, got "
                             f"{self.usd_per_kwh!r}")


@dataclass(frozen=True)
class HourlyPrice:
    """One device's price per device-hour and where it came from."""

    usd_per_hour: float
    source: str
    """Quote key, provider and source (or the amortisation arithmetic)."""


def rent_price(quotes: list[dict[str, Any]]) -> HourlyPrice | None:
    """The lowest on-demand per-device-hour quote (RENT_TERMS), or None."""
    rented = [(per_device_hour(q), q) for q in quotes
              if q.get("kind") == "rent" and q.get("term") in RENT_TERMS]
    rented = [(usd, q) for usd, q in rented if usd is not None]
    if not rented:
        return None
    usd, q = min(rented, key=lambda uq: uq[0])
    return HourlyPrice(usd, f"{q['provider']} {q['term']} list price, {q['source']} "
                            f"(read {q.get('date', 'n/a')}; data/prices.toml)")


def per_device_hour(quote: dict[str, Any]) -> float | None:
    """USD per device-hour of a rent quote (an instance price divided by its devices)."""
    if quote.get("unit") == "device-hour":
        return quote.get("usd")
    return quote.get("usd_per_device_hour")


def amortised_price(quotes: list[dict[str, Any]], rule: PriceRule) -> HourlyPrice | None:
    """Purchase / (years × 8760 h) + watts / 1000 × USD/kWh, for the first buy quote with a
    price; None without one."""
    bought = [q for q in quotes if q.get("kind") == "buy" and q.get("usd")]
    if not bought:
        return None
    q = bought[0]
    hours = rule.amortise_years * HOURS_PER_YEAR
    energy = (q.get("watts") or 0) / 1000 * rule.usd_per_kwh
    usd = q["usd"] / hours + energy
    return HourlyPrice(usd, f"bought: ${q['usd']:,.0f} over {rule.amortise_years:g} years of "
                            f"use + {q.get('watts') or 0} W at ${rule.usd_per_kwh:g}/kWh "
                            f"({q['source']}; data/prices.toml)")


def quotes_for(device_key: str, table: dict[str, Any]) -> list[dict[str, Any]]:
    """The quotes of one device, in file order."""
    return [q for q in table.get("prices", {}).values() if q.get("device") == device_key]


def hourly_price(device_key: str, table: dict[str, Any], catalogue_usd: float | None,
                 catalogue_source: str | None, rule: PriceRule = PriceRule()
                 ) -> HourlyPrice | None:
    """The device's price per device-hour by the module's rule."""
    quotes = quotes_for(device_key, table)
    rented = rent_price(quotes)
    if rented is not None:
        return rented
    if catalogue_usd is not None:
        return HourlyPrice(catalogue_usd, catalogue_source or "data/devices.toml")
    return amortised_price(quotes, rule)


def cost_usd(seconds: float, num_devices: int, usd_per_hour: float | None) -> float | None:
    """num_devices × hours × price (USD); None without a price."""
    if usd_per_hour is None:
        return None
    return num_devices * usd_per_hour * seconds / SECONDS_PER_HOUR
