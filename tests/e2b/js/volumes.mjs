// Volumes through the official JS SDK (npm `e2b`, pinned in package.json), unchanged:
// `Volume.create`, `volumeMounts` at `Sandbox.create` (a Volume and a name), two
// sandboxes sharing one volume, the content API (`writeFile`, `readFile`, `list`,
// `makeDir`, `getInfo`, `exists`, `remove`) with the volume's token at
// E2B_VOLUME_API_URL, files outliving the sandboxes, and `Volume.destroy`. Needs the
// variables `colima-e2b env` prints (deploy/e2b-tests.sh sets them). Exits non-zero,
// naming the failed step.
//
//   cd tests/e2b/js && npm ci && node volumes.mjs
import { Sandbox, Volume } from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

watchdog(240)

async function main() {
  const sandboxes = []
  let vol
  try {
    await run('Volume.create, list, getInfo', async () => {
      vol = await Volume.create(`js-${Date.now()}`)
      check(vol.volumeId && vol.token, 'no id or token')
      const listed = await Volume.list()
      check(listed.some((v) => v.volumeId === vol.volumeId && v.name === vol.name), 'not listed')
      const info = await Volume.getInfo(vol.volumeId)
      check(info.token === vol.token, 'getInfo lost the token')
    })

    let a
    let b
    await run('two sandboxes share one volume', async () => {
      a = await Sandbox.create({ timeoutMs: 300_000, volumeMounts: { '/mnt/data': vol } })
      sandboxes.push(a)
      b = await Sandbox.create({ timeoutMs: 300_000, volumeMounts: { '/mnt/shared': vol.name } })
      sandboxes.push(b)
      await a.commands.run('echo from-a > /mnt/data/a.txt')
      const seen = await b.commands.run('cat /mnt/shared/a.txt')
      check(seen.stdout === 'from-a\n', `b read ${JSON.stringify(seen.stdout)}`)
      const info = await Sandbox.getInfo(a.sandboxId)
      check(
        JSON.stringify(info.volumeMounts) === JSON.stringify([{ name: vol.name, path: '/mnt/data' }]),
        `volumeMounts ${JSON.stringify(info.volumeMounts)}`
      )
    })

    await run('the content API reads and writes what the sandboxes see', async () => {
      check((await vol.readFile('a.txt')) === 'from-a\n', 'readFile')
      const w = await vol.writeFile('dir/js.txt', 'from-js')
      check(w.path === '/dir/js.txt' && w.size === 7, `writeFile answered ${JSON.stringify(w)}`)
      const seen = await a.commands.run('cat /mnt/data/dir/js.txt')
      check(seen.stdout === 'from-js', `a read ${JSON.stringify(seen.stdout)}`)
      await vol.makeDir('made/deeper', { force: true })
      const paths = (await vol.list('/', { depth: 2 })).map((e) => e.path).sort()
      check(
        JSON.stringify(paths) === JSON.stringify(['/a.txt', '/dir', '/dir/js.txt', '/made', '/made/deeper']),
        `list ${JSON.stringify(paths)}`
      )
      check((await vol.getInfo('dir/js.txt')).type === 'file', 'getInfo type')
      await vol.remove('made')
      check(!(await vol.exists('made')), 'removed directory still exists')
    })

    await run('files outlive the sandboxes; a free volume is destroyed', async () => {
      await a.kill()
      await b.kill()
      const c = await Sandbox.create({ timeoutMs: 300_000, volumeMounts: { '/data': vol } })
      sandboxes.push(c)
      const seen = await c.commands.run('cat /data/a.txt /data/dir/js.txt')
      check(seen.stdout === 'from-a\nfrom-js', `c read ${JSON.stringify(seen.stdout)}`)
      await c.kill()
      check((await Volume.destroy(vol.volumeId)) === true, 'destroy answered false')
      check(!(await Volume.list()).some((v) => v.volumeId === vol.volumeId), 'still listed')
      vol = undefined
    })
  } finally {
    for (const s of sandboxes) await s.kill().catch(() => {})
    if (vol) await Volume.destroy(vol.volumeId).catch(() => {})
  }
}

main().then(
  () => {
    console.log(`e2b JS volumes: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS volumes: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
