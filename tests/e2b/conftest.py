"""pytest configuration of the E2B SDK compatibility suite (see test_sdk.py)."""

import os

import pytest


def require_e2b_environment():
    """Ends the run unless the SDKs are pointed at a server (`colima-e2b env`)."""
    missing = [
        k
        for k in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")
        if not os.environ.get(k)
    ]
    if missing:
        pytest.exit(
            f"{', '.join(missing)} not set: start the server and "
            '`eval "$(target/debug/colima-e2b env --port P)"` (deploy/e2b-tests.sh does it)',
            returncode=2,
        )


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


# Shared by the parity suites (test_parity.py, test_parity_files.py): sandboxes tagged with
# this run's tag and killed when the test ends, whatever it left.
PARITY_TAG = f"e2b-parity-{os.getpid()}"
PARITY_TEMPLATE = os.environ.get("E2B_TEST_TEMPLATE", "base")


@pytest.fixture
def new_sandbox(request):
    """Factory: ``new_sandbox(**create_kwargs)`` -> a fresh ``e2b.Sandbox``, killed at the
    end of the test. Metadata gets ``suite=<PARITY_TAG>``."""
    require_e2b_environment()
    from e2b import Sandbox

    def make(**kwargs):
        kwargs.setdefault("timeout", 600)
        kwargs["metadata"] = {"suite": PARITY_TAG, **(kwargs.get("metadata") or {})}
        template = kwargs.pop("template", PARITY_TEMPLATE)
        sandbox = Sandbox.create(template, **kwargs)

        def kill():
            try:
                Sandbox.kill(sandbox.sandbox_id)
            except Exception:
                pass

        request.addfinalizer(kill)
        return sandbox

    return make
