"""Cost control's sections of the configuration file, declared as data: [tariffs.NAME]
(each made into a Tariff by tariff.from_config), [[accounts]] and [cost_control].
gateway/service/config.py puts them in the file after the service's own sections, so the
accounts' rules see the configured meters and tariffs."""

import datetime as _dt

from gateway.billing import recovery
from gateway.billing.tariff import TariffError, from_config, parse_hhmm
from gateway.config import (NAME, NUMBER, DecimalNumber, Field, ListOf, ListOfTables, Money,
                            NamedTables, Table)
from gateway.config.schema import Invalid, Kind

def _tariff(name, table):
    """A Tariff from [tariffs.NAME]; its own arrears grades, `[tariffs.NAME.grades]` (the
    keys given, over [cost_control.grades]), kept as `grades` (None without)."""
    table = dict(table)
    grades = table.pop("grades", None)
    tariff = from_config(name, table)
    tariff.grades = None
    if grades is not None:
        try:
            recovery.parse_grades(grades)         # keys and values (their order: below)
        except ValueError as exc:
            raise TariffError("grades", str(exc)) from None
        tariff.grades = dict(grades)
    return tariff


TARIFFS = NamedTables("tariffs", _tariff,
                      doc="[tariffs.NAME]: flat, tiered, tou or tiered_tou (cost-control.md); "
                          "`[tariffs.NAME.grades]`: the tariff's own arrears grades")


# ---------------------------------------------------------------- [[accounts]]

def _check_account(acc, bad, context):
    meters = {m.id for m in context.sections.get("meters", ())}
    if acc["meter"] not in meters:
        bad("meter", "no meter %r" % (acc["meter"],))
    elif acc["meter"] in {a.meter for a in context.earlier}:
        bad("meter", "a second account for meter %s" % acc["meter"])
    tariffs = context.sections.get("tariffs", {})
    if acc["tariff"] not in tariffs:
        bad("tariff", "no tariff %r (tariffs: %s)" % (
            acc["tariff"], ", ".join(sorted(tariffs)) or "none"))
    if not {"alarm1", "alarm2"} & context.failed and acc["alarm2"] > acc["alarm1"]:
        bad("alarm2", "must not be above alarm1")


ACCOUNTS = ListOfTables("accounts", "AccountConfig", [
    Field("meter", NAME, doc_default="required",
          doc="the `[[meters]]` `id`; one account per meter"),
    Field("mode", str, "local", choices=("local", "remote"),
          message="local or remote, not {value!r}",
          doc="`local`: the gateway decides cut-offs; `remote`: the head-end decides"),
    Field("tariff", NAME, doc_default="required", doc="the NAME of a `[tariffs.NAME]`"),
    Field("opening_balance", Money(places=2), required=True,
          doc="the balance the account starts with"),
    Field("alarm1", Money(places=2), "20.00", doc="first warning"),
    Field("alarm2", Money(places=2), "10.00", doc="second warning (pre-trip)"),
    Field("overdraft_limit", Money(places=2), "0.00", doc="credit allowed below zero"),
    Field("restore_threshold", Money(places=2), "0.00",
          doc="合闸允许金额: a top-up must bring the balance above it"),
    Field("max_kw", DecimalNumber(), "60", message="a number of kW",
          doc="the meter's rating: larger jumps are not billed"),
    Field("guarantee", bool, False, message="true or false", doc="保电: never cut off"),
], check=_check_account)


# ---------------------------------------------------------------- [cost_control]

def _hours(ranges):
    out = []
    for r in ranges:
        parts = r.split("-")
        if len(parts) != 2:
            raise ValueError(r)
        out.append(tuple(parse_hhmm(x) for x in parts))
    return tuple(out)


def _check_policy(pol, bad, context):
    try:
        pol["protected_ranges"] = _hours(pol["protected_hours"])
    except (ValueError, AttributeError):
        bad("protected_hours", "a list of \"HH:MM-HH:MM\"")
        pol["protected_ranges"] = ()
    try:
        pol["holiday_dates"] = frozenset(_dt.date.fromisoformat(d) for d in pol["holidays"])
    except (ValueError, TypeError):
        bad("holidays", "a list of \"YYYY-MM-DD\"")
        pol["holiday_dates"] = frozenset()
    if "grades" not in context.failed:
        for name, tariff in (context.sections.get("tariffs") or {}).items():
            try:
                recovery.parse_grades(getattr(tariff, "grades", None) or {}, pol["grades"])
            except ValueError as exc:
                bad("grades", "with [tariffs.%s.grades]: %s" % (name, exc))


class Grades(Kind):
    """[cost_control.grades]: the arrears grades' thresholds (recovery.GRADE_KEYS: yuan
    strings and whole days), the keys given over the defaults; kept as a dict of integers
    (micro-yuan, days)."""

    word = "table"

    def parse(self, value):
        try:
            return recovery.parse_grades(value, recovery.DEFAULT_GRADES)
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    def text(self, value):
        return "light 0.01/0 d, moderate 100.00/30 d, heavy 500.00/90 d"


class Days(Kind):
    word = "list of whole days"

    def parse(self, value):
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 365
                for v in value):
            raise Invalid("must be a list of whole days 1-365, not %r" % (value,))
        return tuple(sorted(set(value), reverse=True))

    def text(self, value):
        return "[%s]" % ", ".join(str(v) for v in value)


_NUMBER_MESSAGE = "must be a number >= 0, not {value!r}"
_STRINGS = ListOf(str, "must be a list of strings, not %r", "list of strings")

COST_CONTROL = Table("cost_control", "CostPolicy", [
    Field("notice_s", NUMBER, 86400, minimum=0, message=_NUMBER_MESSAGE,
          doc="the first warning is at least this old before an automatic cut-off"),
    Field("protected_hours", _STRINGS, ["18:00-08:00"],
          doc="`\"HH:MM-HH:MM\"` local times with no automatic cut-off"),
    Field("protected_weekends", bool, True, doc="no automatic cut-off on Saturday and Sunday"),
    Field("holidays", _STRINGS, [], doc="`\"YYYY-MM-DD\"` dates with no automatic cut-off"),
    Field("breaker_max_count", NUMBER, 10, minimum=0, message=_NUMBER_MESSAGE,
          doc="the mass cut-off breaker: at most this many cut-offs in the window"),
    Field("breaker_max_share", NUMBER, 0.2, minimum=0, message=_NUMBER_MESSAGE,
          doc="... and at most this share of all accounts"),
    Field("breaker_window_s", NUMBER, 3600, minimum=0, message=_NUMBER_MESSAGE,
          doc="the breaker's window"),
    Field("check_interval_s", NUMBER, 30, minimum=0, message=_NUMBER_MESSAGE,
          doc="how often accounts are checked for cut-off and restore"),
    Field("grades", Grades(), dict(recovery.GRADE_DEFAULTS),
          doc="`[cost_control.grades]`: arrears grade thresholds, `light_amount`, "
              "`light_days`, `moderate_amount`, ... (yuan strings, whole days); an account's "
              "own by `account_update`"),
    Field("forecast_window_days", int, 7, minimum=1, maximum=90,
          doc="days of the account's own billing the credit forecast averages"),
    Field("forecast_min_days", int, 3, minimum=1, maximum=90,
          doc="days with the meter read through them needed before a forecast is made"),
    Field("forecast_thresholds", Days(), [7, 3, 1],
          doc="days of credit left at which `balance.forecast` is raised"),
    Field("statement_hour", int, 1, minimum=0, maximum=23,
          doc="local hour each day's statements are made (for the day before)"),
    Field("statement_wait_h", int, 6, minimum=0, maximum=240,
          doc="hours a statement waits for the meter's readings and freeze before it goes "
              "without them"),
], shape="must be a table", check=_check_policy, derived=("protected_ranges", "holiday_dates"))

SECTIONS = (TARIFFS, ACCOUNTS, COST_CONTROL)

AccountConfig = ACCOUNTS.record
CostPolicy = COST_CONTROL.record
for _record in (AccountConfig, CostPolicy):
    _record.__module__ = __name__
