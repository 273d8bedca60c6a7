// The official code-interpreter JS SDK (npm `@e2b/code-interpreter`, pinned in
// package.json), unchanged, against colima-e2b's `code-interpreter-v1` template. Needs
// E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN and E2B_API_KEY, as printed by
// `colima-e2b env --port P` (deploy/e2b-tests.sh sets them). Exits non-zero, naming the
// failed step, on any failure.
//
//   cd tests/e2b/js && npm ci && node code_interpreter.mjs
import { Sandbox } from '@e2b/code-interpreter'

import { check, progress, run, watchdog } from './harness.mjs'

watchdog(300)

const PNG_MAGIC = Buffer.from([0x89, 0x50, 0x4e, 0x47])

async function main() {
  let sbx
  try {
    await run('Sandbox.create() (template code-interpreter-v1) with envs', async () => {
      sbx = await Sandbox.create({ timeoutMs: 600_000, envs: { JS_CREATE_VAR: 'from-create' } })
    })

    await run('runCode("1+1") -> text "2"', async () => {
      const ex = await sbx.runCode('1+1')
      check(ex.text === '2', `text was ${JSON.stringify(ex.text)}`)
      check(ex.error === undefined, `error: ${JSON.stringify(ex.error)}`)
      check(ex.results.length === 1 && ex.results[0].isMainResult, 'one main result')
    })

    await run('onStdout streams while the code runs', async () => {
      const seen = []
      let firstAt
      const started = Date.now()
      const ex = await sbx.runCode(
        "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
        {
          onStdout: (m) => {
            firstAt ??= Date.now()
            seen.push(m.line)
          },
        },
      )
      const ended = Date.now()
      check(seen.join('') === 'first\nsecond\n', `stdout was ${JSON.stringify(seen)}`)
      check(ex.logs.stdout.join('') === 'first\nsecond\n', 'logs.stdout')
      check(firstAt - started < ended - started - 1000, 'first line came with the end')
    })

    await run('an exception -> error name, value, traceback', async () => {
      const ex = await sbx.runCode('1/0')
      check(ex.error?.name === 'ZeroDivisionError', `name ${ex.error?.name}`)
      check(ex.error.value === 'division by zero', `value ${ex.error.value}`)
      check(ex.error.traceback.includes('ZeroDivisionError'), 'traceback')
    })

    await run('matplotlib -> png; DataFrame -> html and text', async () => {
      const plot = await sbx.runCode(
        'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()',
      )
      const png = plot.results.find((r) => r.png)?.png
      check(png, `no png result: ${JSON.stringify(plot.results.map((r) => r.formats()))}`)
      check(Buffer.from(png, 'base64').subarray(0, 4).equals(PNG_MAGIC), 'not a PNG')
      const df = await sbx.runCode("import pandas as pd\npd.DataFrame({'alpha': [1, 2]})")
      check(df.results[0]?.html?.includes('<table'), 'no html table')
      check(df.results[0]?.text?.includes('alpha'), 'no text')
    })

    await run('contexts: state kept, gone after restart, not shared, removed', async () => {
      const one = await sbx.createCodeContext({ language: 'python' })
      const two = await sbx.createCodeContext({ cwd: '/tmp' })
      await sbx.runCode('kept = 41', { context: one })
      const kept = await sbx.runCode('kept + 1', { context: one })
      check(kept.text === '42', `kept + 1 was ${kept.text}`)
      const other = await sbx.runCode('kept', { context: two })
      check(other.error?.name === 'NameError', 'a second context shares state')
      const listed = await sbx.listCodeContexts()
      check(listed.some((c) => c.id === one.id), 'listCodeContexts misses the context')
      await sbx.restartCodeContext(one)
      const gone = await sbx.runCode('kept', { context: one })
      check(gone.error?.name === 'NameError', 'state survived restart')
      await sbx.removeCodeContext(one)
      await sbx.removeCodeContext(two.id)
      const after = await sbx.listCodeContexts()
      check(!after.some((c) => c.id === one.id || c.id === two.id), 'contexts not removed')
    })

    await run('create-time envs and run envs reach the code', async () => {
      const ex = await sbx.runCode("import os; os.environ.get('JS_CREATE_VAR')")
      check(ex.text === 'from-create', `create env: ${ex.text}`)
      const run = await sbx.runCode("os.environ.get('RUN_VAR')", { envs: { RUN_VAR: 'r' } })
      check(run.text === 'r', `run env: ${run.text}`)
    })

    await run('timeoutMs cuts a long loop, the kernel stops and still works', async () => {
      let threw = false
      try {
        await sbx.runCode(
          "import time\nwhile True:\n    open('/tmp/js-ticks','w').write(str(time.time()))\n    time.sleep(0.05)",
          { timeoutMs: 3000 },
        )
      } catch (e) {
        threw = true
      }
      check(threw, 'runCode did not time out')
      await new Promise((r) => setTimeout(r, 1500))
      const a = await sbx.files.read('/tmp/js-ticks')
      await new Promise((r) => setTimeout(r, 1500))
      const b = await sbx.files.read('/tmp/js-ticks')
      check(a === b, 'the loop went on after the client left')
      const ex = await sbx.runCode('1+1', { timeoutMs: 30000 })
      check(ex.text === '2', 'the context does not work after the timeout')
    })

    await run('javascript and bash contexts', async () => {
      const js = await sbx.runCode('const x = 40; x + 2', { language: 'js' })
      check(js.text === '42', `js: ${js.text} ${JSON.stringify(js.error)}`)
      const bash = await sbx.runCode('echo from-bash', { language: 'bash' })
      check(bash.logs.stdout.join('') === 'from-bash\n', `bash: ${bash.logs.stdout}`)
    })
  } finally {
    const current = progress.step
    if (sbx) await sbx.kill().catch(() => {})
    progress.step = current
  }
}

main().then(
  () => {
    console.log(`e2b JS code interpreter: ${progress.passed} passed, 0 failed`)
    process.exit(0)
  },
  (e) => {
    console.error(`FAIL: ${progress.step}: ${e && e.stack ? e.stack : e}`)
    console.log(`e2b JS code interpreter: ${progress.passed} passed, 1 failed`)
    process.exit(1)
  },
)
