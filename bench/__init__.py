"""The benchmark: the gateway against Debian's nginx on the same machine, certificates and backend.

Run it with ``./dev.sh bench`` (see bench/README.md); ``python -m bench --help`` lists the options.
"""
