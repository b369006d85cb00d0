"""HTML pages: one Jinja2 environment, autoescaped, Japanese first, English below.

Every page (refusals, login, portal, audit report) extends ``base.html`` so
they look alike and carry no external assets. Untrusted strings (DNs, user
agents, user IDs) are only ever passed as template data, never formatted
into markup, so autoescaping covers them.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Environment


@cache
def environment() -> Environment:
    """Jinja2 is imported on the first page, not with this module: a worker that
    only proxies logged-in traffic never renders one, and would carry ~1.5 MiB of it."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(
        loader=PackageLoader("gateway.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """Render a template from ``gateway/web/templates`` with the given data."""
    return environment().get_template(template).render(**context)
