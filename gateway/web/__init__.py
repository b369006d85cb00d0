"""What a person sees: pages, their templates, refusal texts and refusal responses.

Owns the Jinja2 environment and ``templates/`` (``pages``), the Japanese
and English texts per reason code (``messages``), the page-or-JSON
refusal with the security headers and the ``static/`` favicon
(``responses``), the HTTP protocol that turns the parser's refusals into
pages (``protocol``) and the admin listener's small app (``admin``). May
import ``gateway.verdict``, ``gateway.config`` and ``gateway.metrics``;
every edge imports it, it imports no edge.
"""
