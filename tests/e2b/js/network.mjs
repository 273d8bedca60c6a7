// E2B's network config through the official JS SDK (npm `e2b`, pinned in package.json),
// unchanged: `network` at create, `updateNetwork` (instance and static), and public
// traffic off with the traffic access token and a masked Host. No traffic leaves this
// machine: what the rules do to real connections is tested against test hosts in
// tests/tests/network_policy.rs. Needs E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN and
// E2B_API_KEY (deploy/e2b-tests.sh sets them). Exits non-zero, naming the failed step.
//
//   cd tests/e2b/js && npm ci && node network.mjs
import http from 'node:http'

import { Sandbox } from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

watchdog(240)

const ECHO_HOST = `
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()
`

/** GET / on `host` (what getHost returns: `<port>-<id>.<domain>`) through the server. */
function getViaHost(host, headers = {}) {
  const port = Number(host.slice(host.lastIndexOf(':') + 1))
  return new Promise((resolve, reject) => {
    const req = http.get(
      { host: '127.0.0.1', port, path: '/', headers: { Host: host, ...headers } },
      (res) => {
        let body = ''
        res.on('data', (c) => (body += c))
        res.on('end', () => resolve({ status: res.statusCode, body }))
      },
    )
    req.on('error', reject)
    req.setTimeout(10_000, () => req.destroy(new Error('timed out')))
  })
}

async function main() {
  const sandboxes = []
  try {
    let sbx
    await run('Sandbox.create({network: {allowOut, denyOut}})', async () => {
      sbx = await Sandbox.create({
        timeoutMs: 120_000,
        network: { allowOut: ['198.51.100.10', 'api.example.com'], denyOut: ['0.0.0.0/0'] },
      })
      sandboxes.push(sbx)
      const r = await sbx.commands.run('echo ok')
      check(r.stdout === 'ok\n', `stdout ${JSON.stringify(r.stdout)}`)
    })

    await run('updateNetwork replaces the rules (instance and static)', async () => {
      await sbx.updateNetwork({ denyOut: ['198.51.100.0/24'], allowOut: ['*.cdn.example.com'] })
      await Sandbox.updateNetwork(sbx.sandboxId, {})
      await sbx.updateNetwork({ allowInternetAccess: false })
    })

    await run('updateNetwork with a host name in denyOut is refused, saying why', async () => {
      let err
      try {
        await sbx.updateNetwork({ denyOut: ['example.com'] })
      } catch (e) {
        err = e
      }
      check(err && String(err.message).includes('denyOut'), `got ${err}`)
      const r = await sbx.commands.run('echo still')
      check(r.stdout === 'still\n', 'the sandbox still runs')
    })

    let open
    await run('allowPublicTraffic: false -> trafficAccessToken; maskRequestHost', async () => {
      open = await Sandbox.create({
        timeoutMs: 120_000,
        network: { allowPublicTraffic: false, maskRequestHost: '${PORT}-masked.test' },
      })
      sandboxes.push(open)
      check(typeof open.trafficAccessToken === 'string', `token ${open.trafficAccessToken}`)
      await open.files.write('/tmp/echo_host.py', ECHO_HOST)
      await open.commands.run('python3 /tmp/echo_host.py', { background: true })
      const host = open.getHost(8000)
      let answer
      for (let i = 0; i < 100; i++) {
        answer = await getViaHost(host, { 'e2b-traffic-access-token': open.trafficAccessToken })
        if (answer.status !== 502) break
        await new Promise((r) => setTimeout(r, 200))
      }
      check(answer.status === 200, `with the token: ${answer.status} ${answer.body}`)
      check(answer.body === '8000-masked.test', `Host inside: ${answer.body}`)
      const without = await getViaHost(host)
      check(without.status === 403, `without the token: ${without.status}`)
      const wrong = await getViaHost(host, { 'e2b-traffic-access-token': 'wrong' })
      check(wrong.status === 403, `with a wrong token: ${wrong.status}`)
    })
  } finally {
    progress.step = 'kill'
    for (const s of sandboxes) await s.kill()
  }
}

main().then(
  () => {
    console.log(`e2b JS network: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS network: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
