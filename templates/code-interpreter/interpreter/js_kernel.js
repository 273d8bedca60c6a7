'use strict';
// colima-e2b code interpreter: the kernel of one JavaScript context.
//
// server.py starts one node process per JavaScript context, with `--fd N` (a Unix
// socket) and `--expose-internals`; the protocol is the one described in
// kernel_channel.py: JSON lines over the socket, output on fd 1 and 2 (pipes server.py
// reads), and a marker "\0<nonce>:<seq>\0" on both before every message.
//
// Cells run with vm.runInThisContext, so the global scope (var, let, const, functions)
// persists from cell to cell and values keep this realm's builtins (no cross-realm
// `instanceof` surprises). The cell's completion value is the main result (text from
// util.inspect); a promise is awaited first. Cells with top-level await are rewritten by
// node's own REPL transform (internal/repl/await) so their declarations still persist
// and their last expression is still the result. Errors give name, message and stack.

const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const path = require('path');
const util = require('util');
const vm = require('vm');
const { Writable } = require('stream');
const { createRequire } = require('module');

// process.stdout and process.stderr write to fd 1 and 2 synchronously. Node's own
// streams would set the pipes O_NONBLOCK, which child processes share (and then fail on
// EAGAIN); a blocking write also lets a slow reader hold the kernel back.
function fdStream(fd) {
  const stream = new Writable({
    write(chunk, encoding, callback) {
      try {
        for (let off = 0; off < chunk.length;) off += fs.writeSync(fd, chunk, off);
        callback();
      } catch (err) {
        callback(err);
      }
    },
  });
  stream.fd = fd;
  stream.isTTY = false;
  stream.on('error', () => {});
  return stream;
}
const stdout = fdStream(1);
const stderr = fdStream(2);
Object.defineProperty(process, 'stdout', { configurable: true, enumerable: true, get: () => stdout });
Object.defineProperty(process, 'stderr', { configurable: true, enumerable: true, get: () => stderr });

let processTopLevelAwait = null;
try {
  ({ processTopLevelAwait } = require('internal/repl/await'));
} catch {
  // Without --expose-internals: fall back to a plain async wrapper (see evaluate).
}
// Newer node versions return the completion value wrapped as `{ value }`.
const wrapsValue = Boolean(processTopLevelAwait) &&
  /return \{ value: \(/.test(processTopLevelAwait('await 0; 1') || '');

const fd = Number(process.argv[process.argv.indexOf('--fd') + 1]);
const sock = new net.Socket({ fd, readable: true, writable: true });
const nonce = crypto.randomBytes(8).toString('hex');
let seq = 0;
let count = 0;
let running = false;
let interrupt = null; // rejects the promise a cell is waiting on

function send(msg) {
  seq += 1;
  const marker = `\0${nonce}:${seq}\0`;
  for (const out of [1, 2]) {
    try { fs.writeSync(out, marker); } catch { /* fd closed by user code */ }
  }
  sock.write(JSON.stringify({ ...msg, sync: seq }) + '\n');
}

class KeyboardInterrupt extends Error {
  constructor() {
    super('Execution interrupted');
    this.name = 'KeyboardInterrupt';
  }
}

// Between cells SIGINT is moot; during a synchronous cell breakOnSigint throws in it;
// during an awaited promise this rejects the wait.
process.on('SIGINT', () => {
  if (running && interrupt) interrupt(new KeyboardInterrupt());
});
// Errors of callbacks that outlive their cell must not end the kernel.
process.on('uncaughtException', (err) => stderr.write(`Uncaught ${util.inspect(err)}\n`));
process.on('unhandledRejection', (err) => stderr.write(`Unhandled rejection ${util.inspect(err)}\n`));

globalThis.require = createRequire(path.join(process.cwd(), '[cell]'));

function interruptible(value) {
  return new Promise((resolve, reject) => {
    interrupt = reject;
    Promise.resolve(value).then(resolve, reject);
  }).finally(() => { interrupt = null; });
}

function isThenable(v) {
  return v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
}

async function evaluate(code) {
  const filename = `<cell ${count}>`;
  let wrapped = null;
  if (processTopLevelAwait) {
    try { wrapped = processTopLevelAwait(code); } catch { wrapped = null; }
  }
  if (wrapped === null) {
    let script;
    try {
      script = new vm.Script(code, { filename });
    } catch (err) {
      // `await` outside the REPL transform: run as an async function (no result,
      // and declarations stay local to the cell).
      if (!processTopLevelAwait && err instanceof SyntaxError && /await/.test(err.message)) {
        script = new vm.Script(`(async () => {\n${code}\n})()`, { filename });
        await interruptible(script.runInThisContext({ breakOnSigint: true }));
        return undefined;
      }
      throw err;
    }
    const value = script.runInThisContext({ breakOnSigint: true });
    return isThenable(value) ? interruptible(value) : value;
  }
  const script = new vm.Script(wrapped, { filename });
  const value = await interruptible(script.runInThisContext({ breakOnSigint: true }));
  return wrapsValue ? (value ? value.value : undefined) : value;
}

// The stack without the frames of this kernel and of node's vm module.
function cleanStack(stack) {
  const lines = String(stack).split('\n');
  const cut = lines.findIndex((l) => /^\s+at /.test(l) && (l.includes('node:vm') || l.includes(__filename)));
  return (cut < 0 ? lines : lines.slice(0, cut)).join('\n');
}

function errorMessage(err) {
  if (err && err.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED') {
    return { type: 'error', name: 'KeyboardInterrupt', value: 'Execution interrupted', traceback: '' };
  }
  if (err instanceof Error || (err && typeof err === 'object' && 'stack' in err)) {
    return { type: 'error', name: String(err.name || 'Error'), value: String(err.message ?? ''), traceback: cleanStack(err.stack) };
  }
  return { type: 'error', name: 'Error', value: util.inspect(err), traceback: `Uncaught ${util.inspect(err)}` };
}

async function execute(msg) {
  Object.assign(process.env, msg.env || {});
  const runEnv = msg.env_run || {};
  const saved = {};
  for (const k of Object.keys(runEnv)) saved[k] = process.env[k];
  Object.assign(process.env, runEnv);
  count += 1;
  running = true;
  send({ type: 'count', n: count });
  try {
    const value = await evaluate(String(msg.code ?? ''));
    if (value !== undefined) {
      send({ type: 'result', result: { text: util.inspect(value) }, main: true });
    }
  } catch (err) {
    send(errorMessage(err));
  } finally {
    running = false;
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    send({ type: 'done' });
  }
}

// Commands arrive one at a time (server.py runs one cell per context at a time), but
// chain them anyway so a cell never overlaps the next.
let queue = Promise.resolve();
let pending = '';
sock.setEncoding('utf8'); // decodes characters split across reads
sock.on('data', (data) => {
  pending += data;
  let nl;
  while ((nl = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, nl);
    pending = pending.slice(nl + 1);
    let msg;
    try { msg = JSON.parse(line); } catch { continue; }
    if (msg.type === 'execute') queue = queue.then(() => execute(msg));
  }
});
sock.on('end', () => process.exit(0));
sock.on('error', () => process.exit(0));

sock.write(JSON.stringify({ type: 'ready', nonce }) + '\n');
