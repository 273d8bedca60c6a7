// Pause and resume as E2B means them, through the official JS SDK (npm `e2b`, pinned in
// package.json), unchanged: `pause()` (memory kept: processes go on), `pause({keepMemory:
// false})` (only the filesystem: files kept, processes gone), `Sandbox.connect` resuming
// both, and `lifecycle: {onTimeout: 'pause', autoResume: true}` paused at its deadline
// and resumed by the next command; createSnapshot, a create from it, fork and
// deleteSnapshot. Needs E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN and
// E2B_API_KEY (deploy/e2b-tests.sh sets them). Exits non-zero, naming the failed step.
//
//   cd tests/e2b/js && npm ci && node persistence.mjs
import { Sandbox } from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

watchdog(240)

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function waitPaused(id) {
  for (let i = 0; i < 300; i++) {
    if ((await Sandbox.getInfo(id)).state === 'paused') return
    await sleep(200)
  }
  throw new Error(`sandbox ${id} was not paused in time`)
}

async function main() {
  const sandboxes = []
  try {
    let sbx
    let bg
    await run('pause() keeps memory: processes go on after connect', async () => {
      sbx = await Sandbox.create({ timeoutMs: 300_000 })
      sandboxes.push(sbx)
      await sbx.files.write('/home/user/kept.txt', 'kept')
      bg = await sbx.commands.run('sleep 4243', { background: true, timeoutMs: 0 })
      await bg.disconnect()
      check((await sbx.pause()) === true, 'pause answered false')
      check((await Sandbox.getInfo(sbx.sandboxId)).state === 'paused', 'not paused')
      sbx = await Sandbox.connect(sbx.sandboxId)
      const pids = (await sbx.commands.list()).map((p) => p.pid)
      check(pids.includes(bg.pid), `process ${bg.pid} gone: ${pids}`)
    })

    await run('pause({keepMemory: false}) keeps only the filesystem', async () => {
      check((await sbx.pause({ keepMemory: false })) === true, 'pause answered false')
      check((await sbx.pause({ keepMemory: false })) === false, 'paused twice: not 409')
      sbx = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
      check((await sbx.files.read('/home/user/kept.txt')) === 'kept', 'file lost')
      const pids = (await sbx.commands.list()).map((p) => p.pid)
      check(!pids.includes(bg.pid), `process ${bg.pid} survived a filesystem pause`)
    })

    await run("lifecycle {onTimeout: 'pause', autoResume: true}", async () => {
      const auto = await Sandbox.create({
        timeoutMs: 3_000,
        lifecycle: { onTimeout: 'pause', autoResume: true },
      })
      sandboxes.push(auto)
      const info = await Sandbox.getInfo(auto.sandboxId)
      check(
        info.lifecycle && info.lifecycle.onTimeout === 'pause' && info.lifecycle.autoResume === true,
        `lifecycle ${JSON.stringify(info.lifecycle)}`,
      )
      await auto.files.write('/home/user/f.txt', 'before')
      await waitPaused(auto.sandboxId)
      const r = await auto.commands.run('cat /home/user/f.txt')
      check(r.stdout === 'before', `stdout ${JSON.stringify(r.stdout)}`)
      check((await Sandbox.getInfo(auto.sandboxId)).state === 'running', 'not resumed')
    })

    await run('createSnapshot, Sandbox.create(snapshotId), fork', async () => {
      const src = await Sandbox.create({ timeoutMs: 300_000 })
      sandboxes.push(src)
      await src.files.write('/home/user/snap.txt', 'snapped')
      const snap = await src.createSnapshot()
      check(typeof snap.snapshotId === 'string' && snap.snapshotId.length > 0, JSON.stringify(snap))
      const child = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
      sandboxes.push(child)
      check((await child.files.read('/home/user/snap.txt')) === 'snapped', 'snapshot lost the file')
      const forks = await src.fork({ count: 2, timeoutMs: 120_000 })
      check(forks.length === 2, `forks: ${forks.length}`)
      for (const f of forks) {
        check(f instanceof Sandbox, `a fork failed: ${f}`)
        sandboxes.push(f)
        check((await f.files.read('/home/user/snap.txt')) === 'snapped', 'fork lost the file')
      }
      await child.kill()
      sandboxes.splice(sandboxes.indexOf(child), 1)
      check((await Sandbox.deleteSnapshot(snap.snapshotId)) === true, 'delete answered false')
    })
  } finally {
    progress.step = 'kill'
    for (const s of sandboxes) await s.kill()
  }
}

main().then(
  () => {
    console.log(`e2b JS persistence: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS persistence: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
