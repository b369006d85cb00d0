"""mTLS login gateway for TDnet, J-IRISS and clearing, and the TSE SSO CA that feeds it."""

__version__ = "0.1.0"
