"""Who may pass: the login edge, its pure decisions, accounts, users, passwords, sessions.

Owns the login and session decisions (``policy``, pure), password hashing
and policy (``passwords``), the user and session stores (``users``,
``sessions``), password login and change shared with the portal
(``accounts``) and the aiohttp login layer (``login``), which plugs into
the app as its access layer. May import config, verdict, errors, metrics,
keys, ``gateway.storage``, ``gateway.certs``, ``gateway.web``,
``gateway.audit.events`` and (``login`` only) ``gateway.app``; never the
server or the CLI.
"""
