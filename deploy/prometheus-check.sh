#!/usr/bin/env bash
# The monitoring files against a real Prometheus scraping a real server on a real engine:
#
#   1. promtool: `check rules` and `test rules` (deploy/prometheus/alerts.yml and its
#      unit tests alerts.test.yml), `check config` (deploy/prometheus/prometheus.yml);
#   2. one colima-e2b server on a free port with its own owner and state directory (a
#      warm pool of 1 for `base`, a template `broken` whose image does not exist, with a
#      pool of its own that can never fill, max_sandboxes 3, max_concurrent_creates 1),
#      and activity through the native API: warm and cold creates, a create of `broken`,
#      one past max_sandboxes, commands (ok, nonzero, timeout, background, a WebSocket
#      stream), kills, an expiry;
#   3. Prometheus (Debian's package, run here as a plain process on 127.0.0.1 with a
#      temporary TSDB, scraping that server every second with the key `colima-e2b env`
#      prints, evaluating alerts.yml), and through its HTTP API:
#      - the target is up;
#      - every series README's "## Metrics" section lists has the type the README gives
#        it (counters end in `_total`, histograms in `_seconds`, the rest are gauges;
#        /api/v1/metadata) and exactly the label names it lists (/api/v1/series; besides
#        job and instance, and `le` on histogram buckets). Series that need rare events
#        (pool, expiries, failures, queueing, WebSockets) are checked when present and
#        named when not observed; every other one must be present;
#      - every rule of alerts.yml loaded and evaluates without error, and neither
#        ColimaE2bServerDown nor ColimaE2bEngineUnreachable is pending or firing;
#      - every `expr` of deploy/grafana/colima-e2b.json runs without error (variables
#        replaced: $job and $instance by .*, $__rate_interval by 1m).
#   (deploy/service-check.sh checks the systemd unit, the compose file and the image.)
#
#   deploy/prometheus-check.sh [docker|podman]
#
# Assumes the engine runs and the template images exist (deploy/engines.sh and
# deploy/images.sh). Installs Debian's `prometheus` package when prometheus or promtool
# is missing (its own service is not used). Builds the static agent and the server, unless
# PROMETHEUS_CHECK_NO_BUILD=1 (then COLIMA_E2B_BIN or target/debug/colima-e2b, and
# COLIMA_E2B_AGENT_BINARY or the build-agent.sh output path). Sends traffic to 127.0.0.1
# only. On exit stops Prometheus and the server and removes every container of the
# owner.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=deploy/lib/suite.sh
. deploy/lib/suite.sh
suite_engine "${1:-docker}"
started_at=$(date +%s)

# ----------------------------------------------------------------------------- promtool
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  step "installing Debian's prometheus package"
  apt_install prometheus
fi
step "promtool: rules, rule unit tests, config"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
promtool check config deploy/prometheus/prometheus.yml
python3 -m json.tool deploy/grafana/colima-e2b.json >/dev/null
suite_require_engine

# ----------------------------------------------------------------------------- build
suite_build "${PROMETHEUS_CHECK_NO_BUILD:-0}"

# ----------------------------------------------------------------------------- cleanup
work=$(mktemp -d "${TMPDIR:-/tmp}/colima-e2b-prometheus-check.XXXXXX")
owner="prom-check-$$-$(date +%s)"
state=$work/state
mkdir -p "$state"
port=$(free_port)
prom_port=$(free_port)
base="http://127.0.0.1:$port"
prom="http://127.0.0.1:$prom_port"
server=
prometheus=
# Only ever called in a subshell (`&`, `$(...)`): it execs, so that `$!` is the server's
# own pid and the EXIT trap's kill reaches the server, not a wrapper shell.
server_env() {
  exec env -u COLIMA_E2B_CONFIG \
    COLIMA_E2B_OWNER="$owner" COLIMA_E2B_STATE_DIR="$state" COLIMA_E2B_LOG_LEVEL=info \
    COLIMA_E2B_BACKEND="$engine" COLIMA_E2B_MAX_SANDBOXES=3 COLIMA_E2B_MAX_CONCURRENT_CREATES=1 \
    COLIMA_E2B_POOL__BASE=1 COLIMA_E2B_POOL__BROKEN=1 \
    COLIMA_E2B_TEMPLATES__BROKEN=colima-e2b/prometheus-check-no-such-image:never "$@"
}
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  if [ -n "$prometheus" ]; then
    kill "$prometheus" 2>/dev/null
    wait "$prometheus" 2>/dev/null
  fi
  suite_stop_and_clean
  suite_finish prometheus-check "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------------------- server
step "server on 127.0.0.1:$port ($engine, owner $owner)"
server_env "$bin" server --host 127.0.0.1 --port "$port" </dev/null >"$work/server.log" 2>&1 &
server=$!
suite_wait_healthy "$base" || { echo "the server exited or is not healthy" >&2; exit 1; }
curl -fsS --max-time 5 "$base/health" >/dev/null || { echo "the server is not healthy" >&2; exit 1; }
# The key, whether or not this loopback needs one: the API calls and the scrape send it.
key=$(server_env "$bin" env --port "$port" | sed -n 's/^export E2B_API_KEY=//p' | tr -d "'\"")
[ -n "$key" ] || { echo "colima-e2b env printed no E2B_API_KEY" >&2; exit 1; }
printf '%s' "$key" >"$work/key"
chmod 600 "$work/key"

# ----------------------------------------------------------------------------- prometheus
step "prometheus on 127.0.0.1:$prom_port (scrapes every second)"
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: colima-e2b
    scrape_timeout: 1s
    authorization:
      credentials_file: $work/key
    static_configs:
      - targets: ["127.0.0.1:$port"]
EOF
promtool check config "$work/prometheus.yml" >/dev/null
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn </dev/null >"$work/prometheus.log" 2>&1 &
prometheus=$!
for _ in $(seq 1 100); do
  curl -fsS --max-time 2 "$prom/-/ready" >/dev/null 2>&1 && break
  kill -0 "$prometheus" 2>/dev/null || { echo "prometheus exited" >&2; exit 1; }
  sleep 0.2
done
curl -fsS --max-time 2 "$prom/-/ready" >/dev/null || { echo "prometheus is not ready" >&2; exit 1; }

# ----------------------------------------------------------------------------- activity
step "activity through the native API"
python3 - "$base" "$work/key" <<'EOF'
import json, socket, sys, threading, time, urllib.error, urllib.request

base, key = sys.argv[1], open(sys.argv[2]).read().strip()
HEADERS = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

def call(method, path, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")

def must(status, body, want, what):
    if status != want:
        sys.exit(f"{what}: expected {want}, got {status}: {body}")
    print(f"  {what}: {status}", file=sys.stderr)
    return body

def metrics_text():
    req = urllib.request.Request(base + "/metrics", headers=HEADERS)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()

def wait_for(line, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if any(l.startswith(line) for l in metrics_text().splitlines()):
            return True
        time.sleep(0.5)
    return False

def create(body, want=200, what="create"):
    return must(*call("POST", "/sandboxes/", body), want, what)

def kill(sid):
    must(*call("DELETE", f"/sandboxes/{sid}"), 200, f"kill {sid}")

# The warm pool of base fills (one member): a claim, then a create that finds it empty.
if not wait_for('colima_e2b_pool_size{template="base"} 1', 120):
    sys.exit("the base pool did not fill within 120 s")
a = create({"template": "base", "timeout": 600}, what="create base (warm)")["sandbox_id"]
b = create({"template": "base", "timeout": 600}, what="create base (pool empty: cold)")["sandbox_id"]

run = lambda sid, body, want, what: must(*call("POST", f"/sandboxes/{sid}/commands/run", body), want, what)
run(a, {"cmd": "echo hello"}, 200, "command ok")
run(a, {"cmd": "exit 3"}, 200, "command nonzero")
run(a, {"cmd": "sleep 5", "timeout": 1}, 408, "command timeout")
pid = must(*call("POST", f"/sandboxes/{a}/commands/run/background", {"cmd": "echo streamed; sleep 1"}),
           200, "background command")["pid"]

# A WebSocket stream of that command (stdlib: the handshake by hand, one read).
s = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10)
s.sendall((f"GET /sandboxes/{a}/commands/stream/{pid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           f"Authorization: Bearer {key}\r\n\r\n").encode())
head = s.recv(4096).decode(errors="replace")
if " 101 " not in head.split("\r\n", 1)[0]:
    sys.exit(f"WebSocket stream: expected 101, got {head.splitlines()[:1]}")
time.sleep(1)
s.close()
print("  WebSocket stream: 101", file=sys.stderr)

# Create failures: an image that does not exist, then one past max_sandboxes (3).
status, body = call("POST", "/sandboxes/", {"template": "broken", "timeout": 60})
if status < 400:
    sys.exit(f"create broken: expected an error, got {status}: {body}")
print(f"  create broken (no image): {status}", file=sys.stderr)
c = create({"template": "base", "timeout": 600, "memory_mb": 256}, what="create base (other limits: cold)")["sandbox_id"]
create({"template": "base", "timeout": 600}, want=429, what="create past max_sandboxes")
for sid in (b, c):
    kill(sid)

# Two cold creates at once with max_concurrent_creates 1: one waits in the queue.
made = []
def cold():
    made.append(create({"template": "base", "timeout": 600, "memory_mb": 256}, what="concurrent create")["sandbox_id"])
threads = [threading.Thread(target=cold) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if len(made) != 2:
    sys.exit("a concurrent create failed")
for sid in made:
    kill(sid)

# An expiry: a sandbox with a 1 s timeout.
d = create({"template": "base", "timeout": 1, "memory_mb": 256}, what="create with a 1 s timeout")["sandbox_id"]
deadline = time.time() + 30
while time.time() < deadline and call("GET", f"/sandboxes/{d}")[0] != 404:
    time.sleep(0.5)
if call("GET", f"/sandboxes/{d}")[0] != 404:
    sys.exit("the 1 s sandbox did not expire within 30 s")
print("  expiry: the 1 s sandbox is gone", file=sys.stderr)
kill(a)
EOF

# ----------------------------------------------------------------------------- checks
step "checks through Prometheus's HTTP API"
python3 - "$prom" "$root/README.md" "$root/deploy/grafana/colima-e2b.json" "$root/deploy/prometheus/alerts.yml" <<'EOF'
import json, re, sys, time, urllib.parse, urllib.request

prom, readme, dashboard, alerts = sys.argv[1:5]
failures = []

def api(path, **params):
    q = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{prom}/api/v1/{path}?{q}", timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    return body

def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}", file=sys.stderr)

# Scrapes after the activity ended, and a rule evaluation after those.
begin = time.time()
deadline = begin + 30
while True:
    targets = api("targets", state="active")["data"]["activeTargets"]
    scraped = [t for t in targets if t["labels"].get("job") == "colima-e2b"]
    rules = api("rules")["data"]["groups"]
    evaluated = [g for g in rules if g.get("lastEvaluation", "")[:4] not in ("", "0001")]
    if scraped and scraped[0]["health"] == "up" and evaluated and time.time() - begin >= 3:
        break
    if time.time() > deadline:
        fail(f"target not up within 30 s: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in scraped]}")
        sys.exit("; ".join(failures))
    time.sleep(0.5)
print(f"  target {scraped[0]['scrapeUrl']}: up", file=sys.stderr)
up = api("query", query='up{job="colima-e2b"}')["data"]["result"]
if not up or up[0]["value"][1] != "1":
    fail(f"up{{job=\"colima-e2b\"}} is {up}")

# README: "## Metrics" up to the next "## ", every `name{labels}` in backticks.
text = open(readme).read()
section = re.search(r"^## Metrics\n(.*?)^## ", text, re.S | re.M)
if not section:
    sys.exit("README.md has no '## Metrics' section")
documented = {}
for name, labels in re.findall(r"`(colima_e2b_[a-z0-9_]+)(?:\{([a-z_,]*)\})?`", section.group(1)):
    documented[name] = set(filter(None, labels.split(",")))
if len(documented) < 10:
    sys.exit(f"README's Metrics section lists only {sorted(documented)}")

def doc_type(name):
    return "counter" if name.endswith("_total") else "histogram" if name.endswith("_seconds") else "gauge"

# Seen only after events this check cannot count on every time; each is checked when
# present and named when not.
rare = {
    "colima_e2b_sandbox_create_failures_total", "colima_e2b_sandbox_expiries_total",
    "colima_e2b_sandbox_creates_queued", "colima_e2b_pool_size", "colima_e2b_pool_claims_total",
    "colima_e2b_pool_misses_total", "colima_e2b_pool_refill_seconds",
    "colima_e2b_pool_refill_failures_total", "colima_e2b_websockets_open",
    "colima_e2b_engine_errors_total",
}
unseen = []
for name in sorted(documented):
    want_type, want_labels = doc_type(name), documented[name]
    meta = api("metadata", metric=name)["data"].get(name, [])
    parts = {"": name} if want_type != "histogram" else {"_bucket": name + "_bucket", "_sum": name + "_sum", "_count": name + "_count"}
    series = {p: api("series", **{"match[]": [f'{{__name__="{n}",job="colima-e2b"}}'], "start": str(begin - 600)})["data"] for p, n in parts.items()}
    if not meta and not any(series.values()):
        if name in rare:
            unseen.append(name)
            print(f"  not observed: {name}", file=sys.stderr)
        else:
            fail(f"{name}: no series and no metadata in Prometheus")
        continue
    before = len(failures)
    types = {m["type"] for m in meta}
    if types != {want_type}:
        fail(f"{name}: type {types or 'unknown'} in Prometheus, README implies {want_type}")
    for part, found in series.items():
        if not found:
            fail(f"{name}{part}: no series")
        for s in found:
            extra = {"le"} if part == "_bucket" else set()
            got = set(s) - {"__name__", "job", "instance"}
            if got != want_labels | extra:
                fail(f"{name}{part}: labels {sorted(got)}, README lists {sorted(want_labels)}"
                     f" ({json.dumps(s, sort_keys=True)})")
                break
    if len(failures) == before:
        print(f"  ok {name} ({want_type}{', labels ' + ','.join(sorted(want_labels)) if want_labels else ''}:"
              f" {sum(len(v) for v in series.values())} series)", file=sys.stderr)

others = sorted({m for m in api("label/__name__/values", **{"match[]": ['{job="colima-e2b"}']})["data"]
                 if m.startswith("colima_e2b_")}
                - {n + s for n in documented for s in ("", "_bucket", "_sum", "_count")})
if others:
    print(f"  note: series the README's Metrics section does not list: {', '.join(others)}", file=sys.stderr)

# Alert rules: all of alerts.yml loaded, evaluated without error; none of the
# "broken deployment" alerts pending or firing on this healthy server.
want_alerts = re.findall(r"^\s*- alert:\s*(\S+)", open(alerts).read(), re.M)
loaded = {r["name"]: r for g in api("rules")["data"]["groups"] for r in g["rules"] if r["type"] == "alerting"}
if sorted(loaded) != sorted(want_alerts):
    fail(f"Prometheus loaded alerts {sorted(loaded)}, alerts.yml has {sorted(want_alerts)}")
for name, r in sorted(loaded.items()):
    if r.get("health") != "ok":
        fail(f"alert {name}: health {r.get('health')}: {r.get('lastError')}")
    q = api("query", query=r["query"])
    if q.get("status") != "success":
        fail(f"alert {name}: expr fails: {q.get('error')}")
    if name in ("ColimaE2bServerDown", "ColimaE2bEngineUnreachable") and r.get("alerts"):
        fail(f"alert {name} is {r['alerts'][0]['state']} on a healthy server")
print(f"  ok {len(loaded)} alert rules evaluate", file=sys.stderr)

# Dashboard: every target's expr, with Grafana's variables replaced.
d = json.load(open(dashboard))
exprs = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", []) if t.get("expr")]
exprs += [(f"variable {v['name']}", v["definition"]) for v in d["templating"]["list"] if v.get("type") == "query"]
empty = []
for title, expr in exprs:
    query = re.sub(r"\$\{?(job|instance)\}?", ".*", expr)
    query = query.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    if title.startswith("variable "):
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        query = f"group by ({m.group(2)}) ({m.group(1)})" if m else query
    q = api("query", query=query)
    if q.get("status") != "success":
        fail(f"dashboard panel {title!r}: {expr}: {q.get('error')}")
    elif not q["data"]["result"]:
        empty.append(title)
print(f"  ok {len(exprs)} dashboard queries run" + (f" (empty now: {', '.join(sorted(set(empty)))})" if empty else ""), file=sys.stderr)

if unseen:
    print(f"\nnot observed (checked only when present): {', '.join(unseen)}", file=sys.stderr)
if failures:
    sys.exit(f"\n{len(failures)} check(s) failed:\n  " + "\n  ".join(failures))
EOF
