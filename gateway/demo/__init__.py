"""``gateway demo``: the whole product on one machine, and the backend it shows.

Owns the demo's setup and run (``runner``) and the small backend that
echoes what it received (``backend``, also used by the tests and
benchmarks). The top of the stack: may import everything but the CLI.
"""
