// E2B parity of the control plane and the proxy through the official JS SDK (npm `e2b`):
// the same behaviours as tests/e2b/test_parity.py. Needs the variables `colima-e2b env`
// prints; exits non-zero naming the failed step; kills every sandbox it created.
//
//   cd tests/e2b/js && node parity.mjs
import { Sandbox, TimeoutError } from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

const TEMPLATE = process.env.E2B_TEST_TEMPLATE || 'base'
const API = process.env.E2B_API_URL
const HEADERS = { 'X-API-Key': process.env.E2B_API_KEY }
const TAG = { suite: 'e2b-js-parity', run: `${process.pid}-${Date.now()}` }

watchdog(300)

const created = []
async function make(template = TEMPLATE) {
  const sbx = await Sandbox.create(template, { timeoutMs: 300_000, metadata: TAG })
  created.push(sbx.sandboxId)
  return sbx
}

async function listIds(opts) {
  const pager = Sandbox.list({ query: { metadata: TAG, ...(opts.query || {}) }, ...opts })
  const out = []
  while (pager.hasNext) out.push(...(await pager.nextItems()).map((s) => s.sandboxId))
  return out
}

async function apiGet(path, params = {}) {
  const url = new URL(API + path)
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, String(v))
  return fetch(url, { headers: HEADERS })
}

async function main() {
  let first, second, third
  await run('Sandbox.list newest first, order asc, startedAfter, template', async () => {
    first = await make()
    await new Promise((r) => setTimeout(r, 1100))
    const middle = new Date()
    second = await make('python')
    third = await make()
    const want = [third.sandboxId, second.sandboxId, first.sandboxId]
    const got = await listIds({ limit: 1 })
    check(JSON.stringify(got) === JSON.stringify(want), `newest first: ${got} != ${want}`)
    const asc = await listIds({ limit: 2, order: 'asc' })
    check(JSON.stringify(asc) === JSON.stringify([...want].reverse()), `asc: ${asc}`)
    const after = await listIds({ limit: 1, query: { startedAfter: middle } })
    check(JSON.stringify(after) === JSON.stringify(want.slice(0, 2)), `startedAfter: ${after}`)
    const py = await listIds({ query: { template: 'python' } })
    check(JSON.stringify(py) === JSON.stringify([second.sandboxId]), `template: ${py}`)
  })

  await run('kill during commands.run -> TimeoutError (sandbox killed)', async () => {
    const started = Date.now()
    setTimeout(() => Sandbox.kill(first.sandboxId), 2000)
    try {
      await first.commands.run('sleep 60', { timeoutMs: 90_000 })
    } catch (e) {
      check(e instanceof TimeoutError, `expected TimeoutError, got ${e && e.constructor.name}: ${e}`)
      check(!/EndStreamResponse|end event/.test(String(e)), `ended as a finished stream: ${e}`)
      check(Date.now() - started < 30_000, 'the stream ended only at the command end')
      return
    }
    throw new Error('commands.run returned although its sandbox was killed')
  })

  await run('setTimeout(0) ends the sandbox', async () => {
    await third.setTimeout(0)
    const deadline = Date.now() + 30_000
    while ((await third.isRunning()) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500))
    }
    check(!(await third.isRunning()), 'still running after setTimeout(0)')
  })

  await run('getMetrics over time and the batch form', async () => {
    let samples = []
    const deadline = Date.now() + 40_000
    while (Date.now() < deadline) {
      samples = await second.getMetrics()
      if (samples.length >= 3) break
      await new Promise((r) => setTimeout(r, 2000))
    }
    check(samples.length >= 3, `only ${samples.length} samples`)
    const stamps = samples.map((m) => m.timestamp.getTime())
    check(stamps.every((t, i) => i === 0 || t >= stamps[i - 1]), 'samples out of order')
    const later = await second.getMetrics({ start: new Date(stamps[1]) })
    check(later.length > 0 && later.length < samples.length + 2, `range gave ${later.length}`)
    const hourAgo = new Date(Date.now() - 3600_000)
    const none = await second.getMetrics({ start: hourAgo, end: new Date(hourAgo.getTime() + 600_000) })
    check(none.length === 0, `samples from before the sandbox: ${none.length}`)
    const r = await apiGet('/sandboxes/metrics', { sandbox_ids: second.sandboxId })
    const body = await r.json()
    check(r.status === 200 && body.sandboxes[second.sandboxId].memTotal > 0, JSON.stringify(body))
  })

  await run('sandbox logs: processes, lifecycle, filters', async () => {
    await second.commands.run('echo js-parity-marker')
    const path = `/v2/sandboxes/${second.sandboxId}/logs`
    const logs = (await (await apiGet(path)).json()).logs
    check(logs[0].message === 'sandbox created', `first entry ${JSON.stringify(logs[0])}`)
    check(
      logs.some((e) => e.message.endsWith('started') && (e.fields.cmd || '').includes('js-parity-marker')),
      'no process start with the command',
    )
    const back = (await (await apiGet(path, { direction: 'backward', limit: 1 })).json()).logs
    check(back.length === 1 && back[0].message === logs[logs.length - 1].message, 'backward')
    const bad = await apiGet('/no/such/route')
    const badBody = await bad.json()
    check(bad.status === 404 && badBody.code === 404, `unknown route ${JSON.stringify(badBody)}`)
  })
}

main()
  .then(
    () => 0,
    (e) => {
      console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
      return 1
    },
  )
  .then(async (code) => {
    for (const id of created) await Sandbox.kill(id).catch(() => {})
    console.log(`e2b JS parity: ${progress.passed} passed, ${code} failed`)
    process.exit(code)
  })
