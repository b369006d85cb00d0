"""Storage: one interface per store, and the SQLite base the SQLite stores share.

Owns the ``typing.Protocol`` of every store (``interfaces``: users and login
failures, sessions, audit events, the CA's issuance records) and the SQLite
plumbing (``sqlite``: WAL, busy timeout, schema versions, the locked
connection). The concrete SQLite stores live with their concern
(``gateway.access.users``, ``gateway.access.sessions``,
``gateway.audit.store``, ``gateway.ca.authority``) and satisfy these
interfaces; a second backend implements the same ones. ``sqlite`` may
import only the standard library and ``gateway.errors`` (it is the bottom
layer); ``interfaces`` imports the stores' record types, for typing only.
"""
