"""pytest configuration of the E2B SDK compatibility suite (see test_sdk.py)."""

import os


def pytest_report_header(config):
    try:
        from importlib.metadata import version

        sdk = version("e2b")
    except Exception:  # pragma: no cover - only informative
        sdk = "unknown"
    return [
        f"e2b SDK {sdk}",
        "E2B_API_URL={} E2B_SANDBOX_URL={} E2B_DOMAIN={}".format(
            os.environ.get("E2B_API_URL", "<unset>"),
            os.environ.get("E2B_SANDBOX_URL", "<unset>"),
            os.environ.get("E2B_DOMAIN", "<unset>"),
        ),
    ]
