"""Certificates: building them, their files, and whether one is acceptable now.

Owns the X.509 builders (``builders``, pure), the PKI file edge (``files``),
the PKCS#12 formats users download (``p12``), the certificate policy (``policy``, a pure decision) and revocation
(``revocation``: CRL parse/verify, the O(1) serial index, the refresher).
Everything above uses it: config, TLS, the CA, the app. May import
``gateway.errors``, ``gateway.verdict``, ``gateway.metrics`` and
``gateway.config``; never TLS, web, access, forward, audit, CA or the app.
"""
