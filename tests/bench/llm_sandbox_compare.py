"""create -> run `echo hi` -> kill: colima-e2b's HTTP API, the official E2B SDK against
colima-e2b, and llm-sandbox (Docker backend, same image), measured in one run.

    pip install llm-sandbox docker e2b
    eval "$(colima-e2b env)"      # the E2B SDK column needs these; skipped without them
    python3 tests/bench/llm_sandbox_compare.py --url http://127.0.0.1:8000 --n 10

Start the server first (e.g. `bash deploy/serve.sh`). Prints medians in milliseconds.
"""

import argparse
import json
import os
import statistics
import time
import urllib.request


def call(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


def colima_e2b(url, n):
    rows = {"create": [], "run echo hi": [], "kill": [], "total": []}
    for _ in range(n):
        t0 = time.perf_counter()
        sid = call("POST", f"{url}/sandboxes/", {"template": "base"})["sandbox_id"]
        t1 = time.perf_counter()
        out = call("POST", f"{url}/sandboxes/{sid}/commands/run", {"cmd": "echo hi"})
        assert out["stdout"] == "hi\n", out
        t2 = time.perf_counter()
        call("DELETE", f"{url}/sandboxes/{sid}")
        t3 = time.perf_counter()
        for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            rows[k].append(v)
    return rows


def e2b_sdk(n):
    """Sandbox.create() + commands.run("echo hi") + kill() with the official SDK."""
    from e2b import Sandbox

    rows = {"create": [], "run echo hi": [], "kill": [], "total": []}
    for _ in range(n):
        t0 = time.perf_counter()
        sandbox = Sandbox.create("base")
        t1 = time.perf_counter()
        result = sandbox.commands.run("echo hi")
        assert result.stdout == "hi\n", result
        t2 = time.perf_counter()
        sandbox.kill()
        t3 = time.perf_counter()
        for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            rows[k].append(v)
    return rows


def llm_sandbox(image, n):
    from llm_sandbox import SandboxSession

    rows = {"create": [], "run echo hi": [], "kill": [], "total": []}
    for _ in range(n):
        t0 = time.perf_counter()
        session = SandboxSession(
            lang="python", image=image, keep_template=True, verbose=False,
            skip_environment_setup=True,
        )
        session.open()
        t1 = time.perf_counter()
        result = session.execute_command("echo hi")
        assert result.stdout.strip() == "hi", result
        t2 = time.perf_counter()
        session.close()
        t3 = time.perf_counter()
        for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            rows[k].append(v)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--image", default="colima-e2b/base:latest")
    a = p.parse_args()
    columns = {"colima-e2b API": colima_e2b(a.url, a.n)}
    if os.environ.get("E2B_API_URL"):
        columns["E2B SDK -> colima-e2b"] = e2b_sdk(a.n)
    columns["llm-sandbox"] = llm_sandbox(a.image, a.n)
    print(f"median ms over {a.n} runs each")
    print(f"{'step':<14}" + "".join(f"{c:>24}" for c in columns))
    for k in next(iter(columns.values())):
        meds = [statistics.median(rows[k]) * 1000 for rows in columns.values()]
        print(f"{k:<14}" + "".join(f"{m:>24.1f}" for m in meds))


if __name__ == "__main__":
    main()
