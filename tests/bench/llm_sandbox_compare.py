"""create -> run `echo hi` -> kill: colima-e2b's HTTP API next to llm-sandbox (Docker
backend, same image), measured in one run.

    pip install llm-sandbox docker
    python3 tests/bench/llm_sandbox_compare.py --url http://127.0.0.1:8000 --n 10

Start the server first (e.g. `bash deploy/serve.sh`). Prints medians in milliseconds.
"""

import argparse
import json
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
    ours = colima_e2b(a.url, a.n)
    theirs = llm_sandbox(a.image, a.n)
    print(f"median ms over {a.n} runs each")
    print(f"{'step':<14}{'colima-e2b API':>16}{'llm-sandbox':>14}")
    for k in ours:
        m1 = statistics.median(ours[k]) * 1000
        m2 = statistics.median(theirs[k]) * 1000
        print(f"{k:<14}{m1:>16.1f}{m2:>14.1f}")


if __name__ == "__main__":
    main()
