"""The audit trail: events, their store, the non-blocking writer and the report page.

Owns the event record and its one serialised form (``events``, pure), the
append-only SQLite store (``store``), the queue-and-thread writer
(``writer``), the ``/audit`` page (``report``), and tamper evidence: the
hash chain, signed checkpoints and their verification (``chain``, pure)
and the signing key file (``signing``). May import config,
errors, metrics, ``gateway.storage`` and ``gateway.web`` (the report
page only); everything that refuses imports it, it imports none of them.
"""
