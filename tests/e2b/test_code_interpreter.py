"""The official code-interpreter SDK (PyPI ``e2b-code-interpreter``), unchanged, against
colima-e2b's ``code-interpreter-v1`` template (built by ``colima-e2b prepare``).

Run by ``deploy/e2b-tests.sh`` with each pinned SDK version (requirements-*.txt). Every
sandbox comes from the SDK's default template and is killed by a finalizer.

Coverage (test -> SDK calls)
  test_one_plus_one                     run_code("1+1") -> text "2", execution_count
  test_stdout_streams_through_callback  run_code(on_stdout=) while the code still runs
  test_exception                        run_code -> error.name, value, traceback
  test_matplotlib_png                   plt.plot + plt.show -> result.png (a PNG)
  test_dataframe_html_and_text          a DataFrame -> result.html and result.text
  test_context_state_and_restart        create_code_context, run_code(context=),
                                        restart_code_context, list/remove_code_context
  test_two_contexts_do_not_share        two contexts, one variable
  test_create_time_envs                 Sandbox.create(envs=), run_code(envs=)
  test_timeout_cuts_a_long_loop         run_code(timeout=) -> TimeoutException, kernel stopped
  test_client_disconnect_interrupts     a raw /execute whose client leaves
  test_javascript_and_bash              run_code(language="js" | "bash")
  test_host_routing_streams             49999-<id>.<domain> Host routing, NDJSON as it comes
  test_secure_sandbox_needs_the_token   /execute without X-Access-Token -> 401
  test_readme_example                   the README's "Code interpreter" example, verbatim
"""

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import require_e2b_environment

RUN_TAG = f"e2b-code-{os.getpid()}"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def new_ci(request):
    """Factory: a fresh code-interpreter sandbox, killed at the end of the test."""
    require_e2b_environment()
    from e2b_code_interpreter import Sandbox

    def make(**kwargs):
        kwargs.setdefault("timeout", 600)
        kwargs["metadata"] = {"suite": RUN_TAG, **(kwargs.get("metadata") or {})}
        sandbox = Sandbox.create(**kwargs)
        request.addfinalizer(lambda: _kill(sandbox))
        return sandbox

    return make


def _kill(sandbox):
    try:
        sandbox.kill()
    except Exception:
        pass


@pytest.fixture(scope="module")
def sbx():
    """One sandbox shared by the tests that do not need their own."""
    require_e2b_environment()
    from e2b_code_interpreter import Sandbox

    sandbox = Sandbox.create(timeout=900, metadata={"suite": RUN_TAG})
    yield sandbox
    _kill(sandbox)


def wait_until(probe, what, timeout=30.0, every=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def test_one_plus_one(sbx):
    execution = sbx.run_code("1+1")
    assert execution.text == "2"
    assert execution.error is None
    assert len(execution.results) == 1 and execution.results[0].is_main_result
    assert isinstance(execution.execution_count, int) and execution.execution_count >= 1


def test_stdout_streams_through_callback(sbx):
    seen = []
    first_at = []

    def on_stdout(msg):
        if not first_at:
            first_at.append(time.monotonic())
        seen.append(msg.line)

    started = time.monotonic()
    execution = sbx.run_code(
        "import sys, time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')\n"
        "print('oops', file=sys.stderr)",
        on_stdout=on_stdout,
    )
    ended = time.monotonic()
    assert "".join(seen) == "first\nsecond\n"
    assert execution.logs.stdout == ["first\n", "second\n"]
    assert execution.logs.stderr == ["oops\n"]
    # "first" arrived while the code still slept, not with the end of the run.
    assert first_at[0] - started < ended - started - 1.0


def test_exception(sbx):
    execution = sbx.run_code("def f():\n    return 1 / 0\nf()")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "ZeroDivisionError" in execution.error.traceback
    assert "f()" in execution.error.traceback
    assert execution.results == []


def test_matplotlib_png(sbx):
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()"
    )
    assert execution.error is None, execution.error
    pngs = [r.png for r in execution.results if r.png]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(PNG_MAGIC)


def test_dataframe_html_and_text(sbx):
    execution = sbx.run_code(
        "import pandas as pd\npd.DataFrame({'alpha': [1, 2], 'beta': ['x', 'y']})"
    )
    assert execution.error is None, execution.error
    main = [r for r in execution.results if r.is_main_result]
    assert len(main) == 1
    assert "<table" in main[0].html and "alpha" in main[0].html
    assert "alpha" in main[0].text and "beta" in main[0].text


def test_context_state_and_restart(sbx):
    ctx = sbx.create_code_context()
    assert ctx.language == "python"
    try:
        sbx.run_code("kept = 41", context=ctx)
        assert sbx.run_code("kept + 1", context=ctx).text == "42"
        assert ctx.id in [c.id for c in sbx.list_code_contexts()]
        sbx.restart_code_context(ctx)
        gone = sbx.run_code("kept", context=ctx)
        assert gone.error is not None and gone.error.name == "NameError"
    finally:
        sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]


def test_two_contexts_do_not_share(sbx):
    one = sbx.create_code_context()
    two = sbx.create_code_context(cwd="/tmp")
    try:
        sbx.run_code("mine = 'one'", context=one)
        other = sbx.run_code("mine", context=two)
        assert other.error is not None and other.error.name == "NameError"
        assert sbx.run_code("import os; os.getcwd()", context=two).text == "/tmp"
        assert sbx.run_code("mine", context=one).text == "one"
    finally:
        sbx.remove_code_context(one)
        sbx.remove_code_context(two)


# A string value's text is the string itself (E2B drops the quotes of its repr).


def test_create_time_envs(new_ci):
    sandbox = new_ci(envs={"CREATE_TIME_VAR": "from-create"})
    execution = sandbox.run_code("import os; os.environ.get('CREATE_TIME_VAR')")
    assert execution.text == "from-create"
    per_run = sandbox.run_code(
        "os.environ.get('RUN_VAR')", envs={"RUN_VAR": "only-this-run"}
    )
    assert per_run.text == "only-this-run"
    # A run's own envs do not stay behind.
    assert sandbox.run_code("os.environ.get('RUN_VAR')").text is None


def _ticks(sandbox, path):
    out = sandbox.files.read(path)
    return int(out) if out.strip() else 0


def test_timeout_cuts_a_long_loop(new_ci):
    from e2b import TimeoutException

    sandbox = new_ci()
    code = (
        "import time\ni = 0\nwhile True:\n    i += 1\n"
        "    open('/tmp/ticks', 'w').write(str(i))\n    time.sleep(0.05)"
    )
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.run_code(code, timeout=3)
    assert time.monotonic() - started < 60
    # The SDK closed the connection; the kernel is interrupted: the ticks stop.
    time.sleep(1.5)
    first = _ticks(sandbox, "/tmp/ticks")
    time.sleep(1.5)
    assert _ticks(sandbox, "/tmp/ticks") == first
    # ...and the context still works.
    assert sandbox.run_code("1+1", timeout=30).text == "2"


def _sandbox_url_request(sandbox):
    """Where a raw request to the interpreter goes, the way the SDK sends it."""
    base = os.environ["E2B_SANDBOX_URL"].rstrip("/")
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49999"}
    token = getattr(sandbox, "_envd_access_token", None)
    if token:
        headers["X-Access-Token"] = token
    return base, headers


def test_client_disconnect_interrupts(new_ci):
    sandbox = new_ci()
    base, headers = _sandbox_url_request(sandbox)
    code = (
        "import time\ni = 0\nwhile True:\n    i += 1\n"
        "    open('/tmp/ticks', 'w').write(str(i))\n"
        "    if i == 1: print('started', flush=True)\n    time.sleep(0.05)"
    )
    with httpx.Client(timeout=60) as client:
        with client.stream(
            "POST", f"{base}/execute", json={"code": code}, headers=headers
        ) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line and json.loads(line).get("type") == "stdout":
                    break
    # The client left. The kernel stops within a second or two.
    def stopped():
        a = _ticks(sandbox, "/tmp/ticks")
        time.sleep(1.0)
        return _ticks(sandbox, "/tmp/ticks") == a

    wait_until(stopped, "the loop to stop after the client left", 20, 0.1)
    assert sandbox.run_code("1+1", timeout=30).text == "2"


def test_javascript_and_bash(sbx):
    js = sbx.run_code("const answer = 40; answer + 2", language="js")
    assert js.error is None, js.error
    assert js.text == "42"
    assert sbx.run_code("answer * 2", language="javascript").text == "80"
    logged = sbx.run_code("console.log('from node')", language="js")
    assert logged.logs.stdout == ["from node\n"]
    thrown = sbx.run_code("throw new TypeError('bad')", language="js")
    assert thrown.error is not None and thrown.error.name == "TypeError"
    assert thrown.error.value == "bad"

    bash = sbx.run_code("X=5; cd /tmp; echo hi", language="bash")
    assert bash.error is None, bash.error
    assert bash.logs.stdout == ["hi\n"]
    kept = sbx.run_code('echo "$X $(pwd)"', language="bash")
    assert "".join(kept.logs.stdout) == "5 /tmp\n"


def test_host_routing_streams(sbx):
    host = sbx.get_host(49999)
    assert host.startswith(f"49999-{sbx.sandbox_id}.")
    # Connect to the server itself and name the sandbox port in the Host header (what
    # resolving `*.localhost` would do).
    port = host.rsplit(":", 1)[1]
    headers = {"Host": host}
    token = getattr(sbx, "_envd_access_token", None)
    if token:
        headers["X-Access-Token"] = token
    code = "import time\nprint('a', flush=True)\ntime.sleep(2)\nprint('b')"
    events = []
    with httpx.Client(timeout=60, trust_env=False) as client:
        started = time.monotonic()
        with client.stream(
            "POST",
            f"http://127.0.0.1:{port}/execute",
            json={"code": code},
            headers=headers,
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            for line in resp.iter_lines():
                if line:
                    events.append((time.monotonic() - started, json.loads(line)))
    kinds = [e["type"] for _, e in events]
    assert kinds[-1] == "end_of_execution"
    first_a = next(t for t, e in events if e.get("text") == "a\n")
    end = events[-1][0]
    # "a" came through the proxy before the run ended: not buffered.
    assert end - first_a > 1.0
    ctxs = httpx.get(
        f"http://127.0.0.1:{port}/contexts", headers=headers, timeout=30, trust_env=False
    )
    assert ctxs.status_code == 200 and any(c["language"] == "python" for c in ctxs.json())


def test_secure_sandbox_needs_the_token(new_ci):
    sandbox = new_ci(secure=True)
    base, headers = _sandbox_url_request(sandbox)
    if "X-Access-Token" not in headers:
        pytest.skip("this SDK does not expose the sandbox's access token")
    del headers["X-Access-Token"]
    refused = httpx.post(
        f"{base}/execute", json={"code": "1+1"}, headers=headers, timeout=30
    )
    assert refused.status_code == 401
    headers["X-Access-Token"] = "wrong"
    assert (
        httpx.post(f"{base}/execute", json={"code": "1+1"}, headers=headers, timeout=30).status_code
        == 401
    )
    # The SDK itself sends it.
    assert sandbox.run_code("1+1").text == "2"


def test_readme_example(tmp_path):
    """The README's Python example in "## Code interpreter", run as a user would."""
    require_e2b_environment()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Code interpreter", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's Code interpreter section has a Python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert "2" in done.stdout.splitlines()[0]
    assert "PNG" in done.stdout
