"""The README's demo command, run for real (as a subprocess, like a person would)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_once_serves_and_refuses(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--once", "--port", "0", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last == {"self_check": {"with_certificate": 200, "without_certificate": 403, "portal_login_page": 200}}
    assert "curl --cacert" in result.stdout and "LC000001.p12" in result.stdout
    keys = list((tmp_path / "demo").glob("*.key")) + list((tmp_path / "demo" / "ca").glob("*.key"))
    assert keys and all(not k.stat().st_mode & 0o077 for k in keys)  # private keys are 0600
