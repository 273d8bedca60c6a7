// What the JS SDK tests share: named steps that print `ok   <step> (<ms> ms)`, checks
// that throw, and a watchdog so a hung stream fails the step instead of hanging CI.

/** The step running now and how many passed. */
export const progress = { step: 'startup', passed: 0 }

/** Throws `message` unless `cond` holds. */
export function check(cond, message) {
  if (!cond) throw new Error(message)
}

/** Runs step `name`, timing it. */
export async function run(name, fn) {
  progress.step = name
  const started = Date.now()
  await fn()
  progress.passed++
  console.log(`ok   ${name} (${Date.now() - started} ms)`)
}

/** Ends the process, naming the step, after `seconds`. */
export function watchdog(seconds) {
  setTimeout(() => {
    console.error(`FAIL: ${progress.step}: timed out after ${seconds} s`)
    process.exit(1)
  }, seconds * 1000).unref()
}
