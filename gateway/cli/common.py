"""What every ``gateway`` command shares: finding the config, counts, times, serials.

One rule finds the configuration file for every command (``--config FILE``,
else ``$GATEWAY_CONFIG``, else ``./gateway.yaml`` if it exists), so an
operator learns it once. Times printed for people are Japan Standard Time
with the offset shown; JSON output keeps UTC. Counts get their plural form.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

from gateway.errors import ConfigError

CONFIG_ENV = "GATEWAY_CONFIG"
DEFAULT_CONFIG = Path("gateway.yaml")
JST = dt.timezone(dt.timedelta(hours=9), "JST")

CONFIG_RULE = f"--config FILE, else ${CONFIG_ENV}, else ./{DEFAULT_CONFIG} if it exists"


def add_config_argument(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
    """The one ``--config`` option; the value is resolved later by :func:`config_path`."""
    parser.add_argument("--config", metavar="FILE", default=None, help=f"config file ({CONFIG_RULE})")


def config_path(given: str | os.PathLike[str] | None) -> Path:
    """The config file a command uses: ``given``, else ``$GATEWAY_CONFIG``, else ``./gateway.yaml``.

    A missing ``./gateway.yaml`` is not guessed past: the error names all three
    ways so the operator sees at once how to point the command at a file.
    """
    if given:
        return Path(given)
    env = os.environ.get(CONFIG_ENV, "")
    if env:
        return Path(env)
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    raise ConfigError(
        [f"no config file: give --config FILE, set ${CONFIG_ENV}, or run where ./{DEFAULT_CONFIG} exists"]
    )


def format_person_time(moment: dt.datetime) -> str:
    """A time for people: JST with the offset shown, e.g. ``2026-11-30 21:00:00+09:00``.

    Naive datetimes are taken as UTC (the stores keep UTC).
    """
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
    return aware.astimezone(JST).isoformat(sep=" ", timespec="seconds")
