"""End-to-end tests in real headless Chromium (issue 6); see README.md."""
