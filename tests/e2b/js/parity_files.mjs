// envd parity of the filesystem through the official E2B JS SDK (npm `e2b`, pinned in
// package.json): the behaviours tests/e2b/test_parity_files.py checks with the Python
// SDK, one step each. Needs E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN and E2B_API_KEY, as
// printed by `colima-e2b env --port P` (deploy/e2b-tests.sh sets them). Exits non-zero,
// naming the failed step, on any failure; always kills the one sandbox it creates.
//
//   cd tests/e2b/js && node parity_files.mjs
import {
  AuthenticationError,
  FileNotFoundError,
  FileType,
  Sandbox,
} from 'e2b'

import { check, progress, run, watchdog } from './harness.mjs'

const TEMPLATE = process.env.E2B_TEST_TEMPLATE || 'base'
const HOME = '/home/user'
const DIR = `${HOME}/js-parity-files`

// A hung stream must not hang CI.
watchdog(240)

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const json = (v) => JSON.stringify(v)

/** Runs `fn`, which must throw an instance of `cls`; returns the error. */
async function expectError(cls, fn) {
  try {
    await fn()
  } catch (e) {
    check(e instanceof cls, `expected ${cls.name}, got ${e && e.constructor.name}: ${e}`)
    return e
  }
  throw new Error(`no ${cls.name}`)
}

async function main() {
  const missing = ['E2B_API_KEY', 'E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_DOMAIN'].filter(
    (k) => !process.env[k],
  )
  check(missing.length === 0, `${missing.join(', ')} not set: eval "$(colima-e2b env --port P)"`)

  let sbx
  await run('Sandbox.create', async () => {
    sbx = await Sandbox.create(TEMPLATE, {
      timeoutMs: 300_000,
      metadata: { suite: 'e2b-js-parity-files', pid: String(process.pid) },
    })
  })
  try {
    await run('getInfo().envdVersion is 0.6.4 or later', async () => {
      const info = await sbx.getInfo()
      const [maj, min, patch] = info.envdVersion.split('.').map(Number)
      check(maj > 0 || min > 6 || (min === 6 && patch >= 4), `envdVersion ${info.envdVersion}`)
    })

    await run('files.list depth 2 is a lexical depth-first walk', async () => {
      // Made in reverse order, so neither creation nor inode order is lexical.
      await sbx.files.makeDir(`${DIR}/walk/b/b1`)
      await sbx.files.makeDir(`${DIR}/walk/a/a1`)
      const entries = await sbx.files.list(`${DIR}/walk`, { depth: 2 })
      const paths = entries.map((e) => e.path.slice(`${DIR}/walk/`.length))
      check(json(paths) === json(['a', 'a/a1', 'b', 'b/b1']), `list gave ${json(paths)}`)
    })

    await run('symlinks: target type and resolved absolute target', async () => {
      const d = `${DIR}/links`
      await sbx.files.write(`${d}/real/file.txt`, 'content')
      await sbx.commands.run(
        `cd ${d} && ln -s real/file.txt to_file && ln -s to_file to_chain && ln -s real to_dir && ln -s missing broken`,
      )
      // This SDK shows envd's `type` (the target's); it does not read isSymlink.
      for (const [name, target, type] of [
        ['to_file', `${d}/real/file.txt`, FileType.FILE],
        ['to_chain', `${d}/real/file.txt`, FileType.FILE],
        ['to_dir', `${d}/real`, FileType.DIR],
      ]) {
        const info = await sbx.files.getInfo(`${d}/${name}`)
        check(info.symlinkTarget === target, `${name}: symlinkTarget ${info.symlinkTarget}`)
        check(info.type === type, `${name}: type ${info.type}`)
        check(info.permissions.startsWith('l'), `${name}: permissions ${info.permissions}`)
      }
      const broken = await sbx.files.getInfo(`${d}/broken`)
      check(broken.symlinkTarget === undefined, `broken: symlinkTarget ${broken.symlinkTarget}`)
      check(broken.type === undefined, `broken: type ${broken.type}`)
      const listed = Object.fromEntries((await sbx.files.list(d)).map((e) => [e.name, e]))
      check(listed.to_dir.type === FileType.DIR, `list to_dir type ${listed.to_dir.type}`)
      check(listed.to_dir.symlinkTarget === `${d}/real`, json(listed.to_dir))
    })

    await run('expired signed URLs: 401 "signature is already expired"', async () => {
      const path = `${DIR}/signed.txt`
      await sbx.files.write(path, 'original')
      const download = await sbx.downloadUrl(path, { useSignatureExpiration: 1 })
      const upload = await sbx.uploadUrl(path, { useSignatureExpiration: 1 })
      await sleep(2500)
      let r = await fetch(download)
      check(r.status === 401, `download status ${r.status}`)
      const body = await r.json()
      check(
        json(body) === json({ code: 401, message: 'signature is already expired' }),
        `download body ${json(body)}`,
      )
      const form = new FormData()
      form.append('file', new Blob(['changed']), 'signed.txt')
      r = await fetch(upload, { method: 'POST', body: form })
      check(r.status === 401, `upload status ${r.status}`)
      check((await r.json()).message === 'signature is already expired', 'upload message')
      check((await sbx.files.read(path)) === 'original', 'the expired upload wrote')
    })

    await run('files.write /0/x: root-only parents made and owned by the user', async () => {
      const info = await sbx.files.write('/0/x', 'written by user', { user: 'user' })
      check(info.path === '/0/x', `write returned ${json(info)}`)
      await sbx.files.write('/0/deeper/still/y', 'y', { user: 'user' })
      const r = await sbx.commands.run(
        "stat -c '%U:%G %n' / /0 /0/x /0/deeper /0/deeper/still /0/deeper/still/y",
        { user: 'root' },
      )
      const want = [
        'root:root /',
        'user:user /0',
        'user:user /0/x',
        'user:user /0/deeper',
        'user:user /0/deeper/still',
        'user:user /0/deeper/still/y',
      ]
      check(json(r.stdout.trim().split('\n')) === json(want), `owners ${json(r.stdout)}`)
    })

    await run('20 MiB upload with an early error gets the agent\'s answer', async () => {
      const big = new Uint8Array(20 << 20).fill(120)
      let e = await expectError(FileNotFoundError, () => sbx.files.write('/proc/nope/x', big))
      check(e.message.includes('/proc/nope'), `message ${e.message}`)
      const stream = new Blob([big]).stream()
      e = await expectError(FileNotFoundError, () =>
        sbx.files.write('/proc/nope/x', stream, { useOctetStream: true }),
      )
      check(e.message.includes('/proc/nope'), `octet-stream message ${e.message}`)
      e = await expectError(AuthenticationError, () =>
        sbx.files.write(`${HOME}/never.bin`, big, { user: 'no-such-user' }),
      )
      check(e.message.includes('no-such-user'), `message ${e.message}`)
      check(!(await sbx.files.exists(`${HOME}/never.bin`)), 'never.bin exists')
    })

    await run('metadata: write, getInfo, list, watchDir includeEntry, replace', async () => {
      const d = `${DIR}/md`
      await sbx.files.makeDir(d)
      const path = `${d}/md.txt`
      const events = []
      const handle = await sbx.files.watchDir(d, (ev) => events.push(ev), {
        includeEntry: true,
      })
      try {
        const want = { author: 'mish', purpose: 'up load' }
        const info = await sbx.files.write(path, 'one', {
          metadata: { Author: 'mish', purpose: 'up load' },
        })
        check(json(info.metadata) === json(want), `write metadata ${json(info.metadata)}`)
        const got = await sbx.files.getInfo(path)
        check(json(got.metadata) === json(want), `getInfo metadata ${json(got.metadata)}`)
        const listed = (await sbx.files.list(d)).find((e) => e.name === 'md.txt')
        check(json(listed.metadata) === json(want), `list metadata ${json(listed.metadata)}`)
        let withEntry
        for (let i = 0; i < 100 && !withEntry; i++) {
          withEntry = events.find((ev) => ev.name === 'md.txt' && ev.entry)
          if (!withEntry) await sleep(100)
        }
        check(withEntry, `no event with an entry: ${json(events)}`)
        check(withEntry.entry.path === path, `event entry ${json(withEntry.entry)}`)
        check(json(withEntry.entry.metadata) === json(want), `event metadata ${json(withEntry.entry)}`)
        const replaced = await sbx.files.write(path, 'two', { metadata: { author: 'alice' } })
        check(json(replaced.metadata) === json({ author: 'alice' }), json(replaced))
        const again = await sbx.files.getInfo(path)
        check(json(again.metadata) === json({ author: 'alice' }), json(again.metadata))
        const cleared = await sbx.files.write(path, 'three')
        check(cleared.metadata === undefined, `cleared write ${json(cleared)}`)
        const none = await sbx.files.getInfo(path)
        check(none.metadata === undefined, `cleared getInfo ${json(none.metadata)}`)
      } finally {
        await handle.stop()
      }
    })
  } finally {
    progress.step = 'kill'
    await sbx.kill()
  }
}

main().then(
  () => {
    console.log(`e2b JS parity_files: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS parity_files: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
