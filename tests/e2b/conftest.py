"""pytest configuration of the E2B SDK compatibility suite (see test_sdk.py)."""

import os
import subprocess

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


def container_state(sandbox_id):
    """The engine's state of the sandbox's container (``running``, ``paused``, ``exited``
    ...), asked of the engine the server uses (``COLIMA_E2B_TEST_BACKEND``, set by
    deploy/e2b-tests.sh); ``None`` when there is no such container."""
    engine = os.environ.get("COLIMA_E2B_TEST_BACKEND")
    if not engine:
        pytest.fail("COLIMA_E2B_TEST_BACKEND is not set (deploy/e2b-tests.sh sets it)")
    cli = [engine]
    if engine == "podman":
        cli += ["--remote", "--url", "unix:///run/podman/podman.sock"]
    out = subprocess.run(
        cli + ["inspect", "--format", "{{.State.Status}}", f"colima-e2b-{sandbox_id}"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def readme_python_blocks(section: str, needle: str):
    """The README's Python examples in ``## <section>`` that contain ``needle``."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1].parent / "README.md").read_text()
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n```", 1)[0] for b in body.split("```python\n")[1:]]
    return [b for b in blocks if needle in b]
