// The dashboard end to end: headless Chromium (Debian's /usr/bin/chromium) driven by
// Playwright against a real server that requires its key (deploy/ui-tests.sh starts it).
// Each step waits for what a person would see, within a bound; the first that does not
// appear fails the run with what the page showed.
import { chromium } from "playwright-core";

const base = process.env.UI_BASE_URL;
const key = process.env.UI_API_KEY;
const template = process.env.UI_TEMPLATE;
const marker = process.env.UI_BUILD_MARKER;
if (!base || !key || !template || !marker) {
  console.error("UI_BASE_URL, UI_API_KEY, UI_TEMPLATE and UI_BUILD_MARKER are required");
  process.exit(2);
}
const WAIT = { timeout: 30_000 };

async function api(method, path, body) {
  const resp = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  if (!resp.ok) throw new Error(`${method} ${path}: ${resp.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

function step(what) {
  console.error(`  - ${what}`);
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  // As root, on a closed network: no sandbox, and no background calls to the internet.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
page.on("dialog", (d) => d.accept());
let sandbox;
try {
  step("without the key the page asks for it (the server requires one)");
  await page.goto(base + "/ui");
  await page.locator("#status", { hasText: "API key" }).waitFor(WAIT);
  if (await page.locator("#sandboxes tbody tr").count() !== 0) throw new Error("rows listed without a key");

  step("with the key");
  await page.fill("#key", key);
  await page.click("#key-form button[type=submit]");
  await page.locator("#forget").waitFor({ state: "visible", ...WAIT });

  step("a sandbox created through the API is listed, with live usage");
  sandbox = (await api("POST", "/sandboxes", { template: "base", timeout: 300 })).sandbox_id;
  const row = page.locator(`#sandboxes tr[data-sandbox-id="${sandbox}"]`);
  await row.waitFor(WAIT);
  await row.locator("td.state", { hasText: "running" }).waitFor(WAIT);
  if (!(await row.innerText()).includes("base")) throw new Error("the row does not name its template");
  await row.locator("td.memory", { hasText: "MiB" }).waitFor(WAIT);
  await row.locator("td.cpu", { hasText: "%" }).waitFor(WAIT);
  await row.locator("td.disk", { hasText: "MiB" }).waitFor(WAIT);

  step("its processes");
  await api("POST", `/sandboxes/${sandbox}/commands/run/background`, { cmd: "sleep 31337" });
  await row.locator("button.open").click();
  await page.locator("#detail-id", { hasText: sandbox }).waitFor(WAIT);
  await page.locator("#processes tbody tr", { hasText: "sleep 31337" }).waitFor(WAIT);

  step("a command typed into its terminal shows its output");
  await page.click("#open-terminal");
  await page.locator("#terminal-status", { hasText: "Connected" }).waitFor(WAIT);
  await page.locator("#terminal .xterm-rows", { hasText: "$" }).waitFor(WAIT);
  await page.locator("#terminal .xterm").click();
  await page.keyboard.type("echo typed-$((6*7)) $(whoami)");
  await page.keyboard.press("Enter");
  // The typed line shows `$((6*7))`; only the command's output says 42.
  await page.locator("#terminal .xterm-rows", { hasText: "typed-42 user" }).waitFor(WAIT);

  step("templates and a build's log");
  await page.locator(`#templates tr[data-template="${template}"]`).click();
  await page.locator("#builds tbody tr", { hasText: "ready" }).first().click();
  await page.locator("#build-log", { hasText: marker }).waitFor(WAIT);

  if (process.env.UI_TESTS_SCREENSHOT) await page.screenshot({ path: process.env.UI_TESTS_SCREENSHOT });

  step("a sandbox killed through the API disappears, and its detail closes");
  await api("DELETE", `/sandboxes/${sandbox}`);
  sandbox = null;
  await row.waitFor({ state: "detached", ...WAIT });
  await page.locator("#detail").waitFor({ state: "hidden", ...WAIT });

  step("the kill button kills");
  const other = (await api("POST", "/sandboxes", { template: "base", timeout: 300 })).sandbox_id;
  const otherRow = page.locator(`#sandboxes tr[data-sandbox-id="${other}"]`);
  await otherRow.locator("button.kill").click(WAIT);
  await otherRow.waitFor({ state: "detached", ...WAIT });
  const left = await api("GET", "/sandboxes");
  if (left.some((s) => s.sandbox_id === other)) throw new Error("the kill button left the sandbox running");

  // Chromium logs every answer that is not 2xx ("Failed to load resource"): the 401s
  // before the key, a 404 for a sandbox killed while a refresh was under way. What the
  // page does with them is what the steps above check; its own errors must not happen.
  const unexpected = problems.filter((p) => !/Failed to load resource/.test(p));
  if (unexpected.length) throw new Error(unexpected.join("\n"));
  console.error("dashboard: all steps passed");
} catch (e) {
  console.error(`dashboard: FAILED: ${e.message}`);
  console.error("--- page status: " + (await page.locator("#status").innerText().catch(() => "?")));
  console.error("--- problems: " + problems.join("\n"));
  process.exitCode = 1;
} finally {
  if (sandbox) await api("DELETE", `/sandboxes/${sandbox}`).catch(() => {});
  await browser.close();
}
