// E2B's template-build API through the official E2B JS SDK (npm `e2b`, pinned in
// package.json), unchanged, against colima-e2b. Needs E2B_API_URL, E2B_SANDBOX_URL,
// E2B_DOMAIN and E2B_API_KEY, as printed by `colima-e2b env --port P` (deploy/e2b-tests.sh
// sets them). Builds templates with unique names from a temporary file context, checks
// sandboxes made from them, and deletes them at the end (DELETE /templates/{id}: the SDK
// has no delete call). Exits non-zero, naming the failed step, on any failure.
//
//   cd tests/e2b/js && npm ci && node templates.mjs
import { randomBytes } from 'node:crypto'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { BuildError, Sandbox, Template, waitForURL } from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

const TOKEN = randomBytes(4).toString('hex')
const NAME = `t-${TOKEN}-js`
const FAILING = `t-${TOKEN}-js-fails`
const STEPS = 7 // steps of fullTemplate()



// The line this is called from.
function lineHere() {
  const frame = new Error().stack.split('\n')[2] ?? ''
  const m = frame.match(/:(\d+):\d+\)?$/)
  return m ? Number(m[1]) : -1
}

// Builds on a 2-core machine take a while; a hung poll must not hang CI.
watchdog(480)

function api(method, path) {
  const url = process.env.E2B_API_URL.replace(/\/+$/, '') + path
  return fetch(url, { method, headers: { 'X-API-KEY': process.env.E2B_API_KEY } })
}

// stdout of a command that must succeed, trimmed.
async function sh(sbx, cmd, opts) {
  const r = await sbx.commands.run(cmd, opts)
  check(r.exitCode === 0, `${cmd}: exit code ${r.exitCode}, stderr ${JSON.stringify(r.stderr)}`)
  return r.stdout.trim()
}

function idsFromLogs(logs) {
  for (const e of logs) {
    const m = /^Template created with ID: (\S+), Build ID: (\S+)$/.exec(e.message)
    if (m) return { templateId: m[1], buildId: m[2] }
  }
  return undefined
}

function fullTemplate(ctx) {
  return Template({ fileContextPath: ctx })
    .fromBaseImage()
    .runCmd(`echo marker-${TOKEN}-$(whoami) | tee /tmp/marker`) // 1
    .copy('run.sh', '/opt/tool/', { user: 'root', mode: 0o750 }) // 2
    .copy('assets', '/app/assets/') // 3
    .setEnvs({ GREETING: 'hello', TPL_SPACES: 'two words' }) // 4
    .setWorkdir('/app') // 5
    .runCmd('{ whoami; pwd; echo "$GREETING"; } > build-info.txt', { user: 'root' }) // 6
    .setUser('user') // 7
    .setStartCmd(
      'python3 -m http.server 8080 --bind 127.0.0.1 > /tmp/http.log 2>&1',
      waitForURL('http://localhost:8080/'),
    )
}

async function main() {
  const missing = ['E2B_API_KEY', 'E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_DOMAIN'].filter(
    (k) => !process.env[k],
  )
  check(missing.length === 0, `${missing.join(', ')} not set: eval "$(colima-e2b env --port P)"`)

  const ctx = mkdtempSync(join(tmpdir(), 'e2b-js-templates-'))
  // The token makes the files new to the server (its upload cache is by content).
  writeFileSync(join(ctx, 'run.sh'), `#!/bin/sh\necho tool-ok-${TOKEN}\n`)
  mkdirSync(join(ctx, 'assets', 'sub'), { recursive: true })
  writeFileSync(join(ctx, 'assets', 'a.txt'), `alpha-${TOKEN}\n`)
  writeFileSync(join(ctx, 'assets', 'sub', 'b.txt'), 'beta\n')

  const templateIds = new Set()
  let sbx
  let info
  try {
    await run('Template.exists before the build', async () => {
      check((await Template.exists(NAME)) === false, `${NAME} exists before its build`)
    })

    await run('Template.build: runCmd copy setEnvs setWorkdir setUser setStartCmd', async () => {
      const logs = []
      try {
        info = await Template.build(fullTemplate(ctx), NAME, { onBuildLogs: (e) => logs.push(e) })
      } catch (e) {
        console.error(logs.map(String).join('\n'))
        const ids = idsFromLogs(logs)
        if (ids) templateIds.add(ids.templateId)
        throw e
      }
      templateIds.add(info.templateId)
      check(info.name === NAME, `BuildInfo.name ${info.name}`)
      check(info.templateId && /^[0-9a-f-]{36}$/.test(info.buildId), JSON.stringify(info))
      const text = logs.map((e) => e.message)
      check(text.includes(`Uploaded 'run.sh'`), `no upload of run.sh in ${JSON.stringify(text)}`)
      check(text.includes(`Uploaded 'assets'`), `no upload of assets in ${JSON.stringify(text)}`)
      check(
        text.includes(`marker-${TOKEN}-user`),
        `step 1's output line is not in the logs: ${JSON.stringify(text)}`,
      )
      const errors = logs.filter((e) => e.level === 'error')
      check(errors.length === 0, `error entries: ${errors.map(String).join('; ')}`)
      const st = await Template.getBuildStatus(info, { logsOffset: 0 })
      check(st.status === 'ready', `status ${st.status}`)
    })

    await run('Template.exists after the build', async () => {
      check((await Template.exists(NAME)) === true, `${NAME} does not exist after its build`)
      check((await Template.exists(`t-${TOKEN}-nosuch`)) === false, 'a random name exists')
    })

    await run('Sandbox.create(name): files, owners, modes, envs, workdir, user', async () => {
      sbx = await Sandbox.create(NAME, {
        timeoutMs: 300_000,
        metadata: { suite: 'e2b-js-templates', pid: String(process.pid) },
      })
      check((await sh(sbx, 'cat /tmp/marker')) === `marker-${TOKEN}-user`, 'marker file')
      const st = await sh(sbx, "stat -c '%U %a' /opt/tool/run.sh")
      check(st === 'root 750', `run.sh is ${st}`)
      const tool = await sh(sbx, '/opt/tool/run.sh', { user: 'root' })
      check(tool === `tool-ok-${TOKEN}`, `run.sh printed ${JSON.stringify(tool)}`)
      const readable = await sh(sbx, 'test -r /opt/tool/run.sh && echo readable || echo unreadable')
      check(readable === 'unreadable', 'a 0750 root file is readable by user')
      const assets = await sh(sbx, 'cat /app/assets/a.txt /app/assets/sub/b.txt')
      check(assets === `alpha-${TOKEN}\nbeta`, `assets ${JSON.stringify(assets)}`)
      const owners = await sh(sbx, 'stat -c %U /app/assets/a.txt /app/assets/sub/b.txt')
      check(owners === 'user\nuser', `assets owners ${JSON.stringify(owners)}`)
      const envs = await sh(sbx, 'echo "$GREETING|$TPL_SPACES"')
      check(envs === 'hello|two words', `envs ${JSON.stringify(envs)}`)
      const built = await sh(sbx, 'cat /app/build-info.txt')
      check(built === 'root\n/app\nhello', `root step wrote ${JSON.stringify(built)}`)
      const who = await sh(sbx, 'echo "$(whoami) $(pwd)"')
      check(who === 'user /app', `default user and cwd ${JSON.stringify(who)}`)
    })

    await run('start command running (ready command passed)', async () => {
      const listing = await sh(sbx, 'curl -sf http://127.0.0.1:8080/')
      check(
        listing.includes('assets/') && listing.includes('build-info.txt'),
        `http.server does not list /app: ${listing.slice(0, 300)}`,
      )
      const pid = await sh(sbx, "pgrep -o -f '^python3 -m [h]ttp[.]server 8080'")
      check((await sh(sbx, `ps -o user= -p ${pid}`)) === 'user', 'start command not run as user')
      check((await sh(sbx, `readlink /proc/${pid}/cwd`)) === '/app', 'start command cwd')
    })

    await run('rebuild: uploads skipped, steps cached', async () => {
      const logs = []
      const again = await Template.build(fullTemplate(ctx), NAME, {
        onBuildLogs: (e) => logs.push(e),
      })
      templateIds.add(again.templateId)
      check(again.templateId === info.templateId, `new template ID ${again.templateId}`)
      check(again.buildId !== info.buildId, 'same build ID')
      const text = logs.map((e) => e.message)
      for (const src of ['run.sh', 'assets']) {
        check(
          text.includes(`Skipping upload of '${src}', already cached`),
          `${src} uploaded again: ${JSON.stringify(text)}`,
        )
      }
      const cached = logs.filter((e) => e.message === 'cached')
      check(cached.length >= STEPS, `${cached.length} cached entries for ${STEPS} steps`)
      check(
        cached.every((e) => e.level === 'debug'),
        `cached entries not at debug: ${cached.map(String)}`,
      )
      check(!text.includes(`marker-${TOKEN}-user`), 'step 1 ran again in a cached build')
    })

    await run('failing runCmd -> BuildError naming the step', async () => {
      let t = Template({ fileContextPath: ctx }).fromBaseImage()
      t = t.runCmd('echo before-the-failure') // step 1
      // The pause: Podman 4.3's build endpoint can drop output written in the instant
      // before a step fails (README, Building templates).
      const failingLine = lineHere() + 1
      t = t.runCmd('echo about-to-fail >&2; sleep 1; exit 3') // step 2
      t = t.runCmd('echo never-runs') // step 3
      const logs = []
      let error
      try {
        await Template.build(t, FAILING, { onBuildLogs: (e) => logs.push(e) })
      } catch (e) {
        error = e
      }
      const ids = idsFromLogs(logs)
      if (ids) templateIds.add(ids.templateId)
      check(error !== undefined, 'the build of a failing step succeeded')
      check(error instanceof BuildError, `expected BuildError, got ${error}`)
      check(
        error.message.includes('step 2') && error.message.includes('exit code 3'),
        `message ${JSON.stringify(error.message)}`,
      )
      // The SDK sets the stack to the failing step's builder call (from reason.step).
      const first = String(error.stack).split('\n')[0]
      check(
        first.includes(`templates.mjs:${failingLine}:`),
        `stack does not start at templates.mjs:${failingLine}: ${error.stack}`,
      )
      const text = logs.map((e) => e.message)
      check(text.includes('about-to-fail'), `no step output line: ${JSON.stringify(text)}`)
      check(!text.includes('never-runs'), 'step 3 ran after step 2 failed')
      check(ids, 'no template ID in the logs')
      const st = await Template.getBuildStatus(ids, { logsOffset: 0 })
      check(st.status === 'error', `status ${st.status}`)
      check(st.reason?.step === '2', `reason ${JSON.stringify(st.reason)}`)
    })

    await run('getInfo: templateId is the template ID, kill', async () => {
      const got = await sbx.getInfo()
      check(
        got.templateId === info.templateId,
        `sandbox templateId ${got.templateId}, want ${info.templateId} (name ${got.name})`,
      )
      check((await sbx.kill()) === true, 'kill() did not return true')
      sbx = undefined
    })

    await run('DELETE /templates/{id} -> Template.exists false', async () => {
      const r = await api('DELETE', `/templates/${info.templateId}`)
      check(r.status === 204, `DELETE answered ${r.status} ${await r.text()}`)
      templateIds.delete(info.templateId)
      check((await Template.exists(NAME)) === false, `${NAME} still exists after DELETE`)
    })
  } finally {
    const current = progress.step
    if (sbx) await sbx.kill().catch(() => {})
    for (const id of templateIds) await api('DELETE', `/templates/${id}`).catch(() => {})
    rmSync(ctx, { recursive: true, force: true })
    progress.step = current
  }
}

main().then(
  () => {
    console.log(`e2b JS templates: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS templates: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
