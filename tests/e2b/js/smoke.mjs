// Smoke test of the official E2B JS SDK (npm `e2b`, pinned in package.json) against
// colima-e2b. Needs E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN and E2B_API_KEY, as printed
// by `colima-e2b env --port P` (deploy/e2b-tests.sh sets them). Exits non-zero, naming the
// failed step, on any failure; always kills the sandbox it created.
//
//   cd tests/e2b/js && npm ci && node smoke.mjs
import { CommandExitError, Sandbox } from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

const TEMPLATE = process.env.E2B_TEST_TEMPLATE || 'base'
const DIR = '/home/user/js-smoke'



// A hung stream must not hang CI.
watchdog(240)

async function main() {
  const missing = ['E2B_API_KEY', 'E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_DOMAIN'].filter(
    (k) => !process.env[k],
  )
  check(missing.length === 0, `${missing.join(', ')} not set: eval "$(colima-e2b env --port P)"`)

  let sbx
  await run('Sandbox.create', async () => {
    sbx = await Sandbox.create(TEMPLATE, {
      timeoutMs: 300_000,
      metadata: { suite: 'e2b-js-smoke', pid: String(process.pid) },
      envs: { SMOKE_ENV: 'from-js' },
    })
    check(/^[a-z0-9]+$/.test(sbx.sandboxId), `bad sandbox id ${JSON.stringify(sbx.sandboxId)}`)
  })
  try {
    await run('commands.run echo hi', async () => {
      const chunks = []
      const r = await sbx.commands.run('echo hi', { onStdout: (d) => chunks.push(d) })
      check(r.exitCode === 0, `exit code ${r.exitCode}`)
      check(r.stdout === 'hi\n', `stdout ${JSON.stringify(r.stdout)}`)
      check(r.stderr === '', `stderr ${JSON.stringify(r.stderr)}`)
      check(chunks.join('') === 'hi\n', `onStdout got ${JSON.stringify(chunks)}`)
    })

    await run('commands.run envs, user, cwd', async () => {
      const r = await sbx.commands.run('echo "$(whoami) $(pwd) $SMOKE_ENV $X"', {
        envs: { X: 'cmd-env' },
      })
      check(
        r.stdout.trim() === 'user /home/user from-js cmd-env',
        `got ${JSON.stringify(r.stdout)}`,
      )
      const root = await sbx.commands.run('whoami', { user: 'root', cwd: '/tmp' })
      check(root.stdout.trim() === 'root', `root run got ${JSON.stringify(root.stdout)}`)
    })

    await run('commands.run non-zero exit -> CommandExitError', async () => {
      try {
        await sbx.commands.run('echo bad >&2; exit 3')
      } catch (e) {
        check(e instanceof CommandExitError, `expected CommandExitError, got ${e}`)
        check(e.exitCode === 3, `exit code ${e.exitCode}`)
        check(e.stderr === 'bad\n', `stderr ${JSON.stringify(e.stderr)}`)
        return
      }
      throw new Error('no error for exit 3')
    })

    await run('files.write / files.read', async () => {
      const info = await sbx.files.write(`${DIR}/hello.txt`, 'hello from js\n')
      check(info.path === `${DIR}/hello.txt`, `write returned ${JSON.stringify(info)}`)
      const text = await sbx.files.read(`${DIR}/hello.txt`)
      check(text === 'hello from js\n', `read ${JSON.stringify(text)}`)
      const bytes = new Uint8Array([0, 1, 2, 250, 251, 252, 253, 254, 255])
      await sbx.files.write(`${DIR}/bytes.bin`, bytes.buffer)
      const back = await sbx.files.read(`${DIR}/bytes.bin`, { format: 'bytes' })
      check(
        Buffer.from(back).equals(Buffer.from(bytes)),
        `bytes round trip gave ${Buffer.from(back).toString('hex')}`,
      )
      const viaShell = await sbx.commands.run(`cat ${DIR}/hello.txt`)
      check(viaShell.stdout === 'hello from js\n', `cat gave ${JSON.stringify(viaShell.stdout)}`)
    })

    await run('files.list', async () => {
      const entries = await sbx.files.list(DIR)
      const names = entries.map((e) => e.name).sort()
      check(
        JSON.stringify(names) === JSON.stringify(['bytes.bin', 'hello.txt']),
        `list gave ${JSON.stringify(names)}`,
      )
      const hello = entries.find((e) => e.name === 'hello.txt')
      check(hello.type === 'file' && hello.path === `${DIR}/hello.txt`, JSON.stringify(hello))
      check(await sbx.files.exists(`${DIR}/hello.txt`), 'exists() is false')
    })

    await run('Sandbox.connect + getInfo', async () => {
      const again = await Sandbox.connect(sbx.sandboxId)
      const r = await again.commands.run(`cat ${DIR}/hello.txt`)
      check(r.stdout === 'hello from js\n', `connected sandbox read ${JSON.stringify(r.stdout)}`)
      const info = await sbx.getInfo()
      check(info.sandboxId === sbx.sandboxId, `getInfo id ${info.sandboxId}`)
      check(info.metadata.suite === 'e2b-js-smoke', `metadata ${JSON.stringify(info.metadata)}`)
      check(await sbx.isRunning(), 'isRunning() is false')
    })
  } finally {
    progress.step = 'kill'
    const killed = await sbx.kill()
    check(killed === true, `kill() returned ${killed}`)
  }
  await run('isRunning after kill', async () => {
    check((await sbx.isRunning()) === false, 'still running after kill()')
  })
}

main().then(
  () => {
    console.log(`e2b JS smoke: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS smoke: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
