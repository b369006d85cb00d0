"""The Tokyo Stock Exchange SSO CA and its issuance service (the portal).

Owns the issuance rules (``issuance``, pure), the CA's key, issuance
database and CRL on disk (``authority``), the CRL schedule
(``publisher``) and the portal's web edge (``portal``). May import config,
verdict, errors, ``gateway.certs``, ``gateway.storage``, ``gateway.audit``,
``gateway.web``, ``gateway.access`` (the portal shares the gateway's user
store and password login) and ``gateway.server`` (the portal's process);
never the gateway's app or the CLI.
"""
