// Drives the web console in Debian's Chromium (headless) with playwright-core, against
// the `drover serve` that tests/tests/console_browser.rs started with real agents.
// Exits non-zero on the first failed check; prints one JSON line of first-render figures
// and where the screenshots went.
//
// env: DROVER_URL, VIEWER_TOKEN, DEPLOYER_TOKEN, PAUSE_ROLLOUT (a running rollout id),
//      LIVE_PLAN (TOML the deployer starts and watches), DRIFT_SCOPE, LINEAGE_MODEL
//      (name/version), SHOTS (directory), CHROMIUM, PLAYWRIGHT_DIR
import { createRequire } from "node:module";
import path from "node:path";
import fs from "node:fs";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const require = createRequire(path.join(env("PLAYWRIGHT_DIR"), "node_modules", "x.js"));
const { chromium } = require("playwright-core");

const base = env("DROVER_URL");
const shots = env("SHOTS");
fs.mkdirSync(shots, { recursive: true });
const step = (s) => console.log(`console-browser: ${s}`);
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function login(browser, token) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  await page.goto(`${base}/console`);
  check(page.url().includes("/console/login"), `no session sends to the login form (at ${page.url()})`);
  // Keyboard only: the token field has a label; Enter submits.
  await page.getByLabel("API token").fill(token);
  await page.keyboard.press("Enter");
  await page.waitForURL(`${base}/console`);
  await page.getByRole("heading", { level: 1, name: "Fleet" }).waitFor();
  return { ctx, page };
}

const browser = await chromium.launch({ executablePath: env("CHROMIUM"), headless: true, args: ["--no-sandbox"] });
try {
  // 1. A viewer: sees everything, no action buttons, no start form.
  const viewer = await login(browser, env("VIEWER_TOKEN"));
  let page = viewer.page;
  const paint = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    const fcp = performance.getEntriesByName("first-contentful-paint")[0];
    return {
      first_contentful_paint_ms: fcp ? Math.round(fcp.startTime) : null,
      dom_content_loaded_ms: Math.round(nav.domContentLoadedEventEnd),
      html_bytes: nav.transferSize,
    };
  });
  console.log(JSON.stringify({ first_render: paint }));
  check(await page.getByRole("table", { name: /Devices, page 1/ }).isVisible(), "the device table has a caption");
  await page.screenshot({ path: path.join(shots, "fleet.png"), fullPage: true });
  await page.keyboard.press("Tab");
  check((await page.evaluate(() => document.activeElement.textContent)) === "Skip to content", "first Tab reaches the skip link");
  await page.keyboard.press("Enter");
  check((await page.evaluate(() => document.activeElement.id)) === "main", "the skip link moves focus to the content");
  // A device page: its telemetry charted (latency p50/p99, errors, CPU and memory).
  await page.locator('#fleet-devices a[href^="/console/devices/"]').first().click();
  await page.getByRole("heading", { level: 1, name: /^Device / }).waitFor();
  for (const id of ["chart-latency", "chart-errors", "chart-host"]) {
    check((await page.locator(`#${id} polyline`).count()) > 0, `${id} has lines`);
  }
  check(await page.getByRole("table", { name: "Model slots" }).isVisible(), "the model slots table");
  step("device page: telemetry charts");
  const pauseId = env("PAUSE_ROLLOUT");
  await page.goto(`${base}/console/rollouts/${pauseId}`);
  await page.locator('[data-status="running"]').waitFor();
  check((await page.locator("button[data-op]").count()) === 0, "a viewer sees no action buttons");
  await page.goto(`${base}/console/rollouts`);
  check((await page.getByRole("button", { name: "Start rollout" }).count()) === 0, "a viewer sees no start form");
  step("viewer: no action buttons");

  // 2. A deployer pauses a rollout (confirming) and sees its state change.
  const deployer = await login(browser, env("DEPLOYER_TOKEN"));
  page = deployer.page;
  let asked = 0;
  page.on("dialog", (d) => {
    asked++;
    d.accept();
  });
  await page.goto(`${base}/console/rollouts/${pauseId}`);
  await page.locator('[data-status="running"]').waitFor();
  await page.getByRole("button", { name: "Pause" }).click();
  await page.locator('[data-status="paused"]').waitFor();
  check(asked === 1, "the pause asked for confirmation");
  check(await page.getByText("paused by dave").first().isVisible(), "the events name who paused");
  step("deployer: paused");

  // 3. The deployer starts a rollout and watches it advance without reloading.
  await page.goto(`${base}/console/rollouts`);
  await page.getByLabel(/Plan \(TOML/).fill(env("LIVE_PLAN"));
  await page.getByRole("button", { name: "Start rollout" }).click();
  await page.waitForURL(/\/console\/rollouts\/\d+$/);
  await page.locator('[data-status="running"]').waitFor();
  await page.evaluate(() => { window.__noReload = true; });
  const seen = new Set();
  for (let i = 0; i < 600; i++) {
    const s = await page.locator("[data-status]").getAttribute("data-status");
    seen.add(s);
    if (s === "completed") break;
    await page.waitForTimeout(200);
  }
  check(seen.has("completed"), `the rollout completed on screen (saw ${[...seen]})`);
  check(await page.evaluate(() => window.__noReload === true), "it advanced without a reload");
  check(await page.getByRole("cell", { name: "2 (current)" }).isVisible(), "the second wave is current");
  await page.screenshot({ path: path.join(shots, "rollout.png"), fullPage: true });
  step("live rollout: running -> completed without reload");

  // 4. A drifting site's chart, alert windows marked.
  await page.goto(`${base}/console/drift`);
  await page.getByRole("link", { name: env("DRIFT_SCOPE"), exact: true }).first().click();
  await page.getByRole("heading", { level: 2, name: `Scope ${env("DRIFT_SCOPE")}` }).waitFor();
  check((await page.locator("figure.chart").count()) > 0, "drift charts drawn");
  check((await page.locator("rect.marked").count()) > 0, "alert windows marked");
  check((await page.getByText("alert").count()) > 0, "the level is written, not only coloured");
  await page.screenshot({ path: path.join(shots, "drift.png"), fullPage: true });
  step("drift chart with alert windows");

  // 5. A model's lineage, followed to the job that trained it.
  const [name, version] = env("LINEAGE_MODEL").split("/");
  await page.goto(`${base}/console/models`);
  await page.getByRole("link", { name: `${name}@${version}`, exact: true }).first().click();
  await page.getByRole("heading", { level: 1, name: `Model ${name}@${version}` }).waitFor();
  await page.screenshot({ path: path.join(shots, "model.png"), fullPage: true });
  await page.locator('[data-lineage="job"] a').click();
  await page.getByRole("heading", { level: 1, name: /Training job \d+/ }).waitFor();
  check(await page.getByRole("cell", { name: new RegExp(`${name}@${version}`) }).first().isVisible(), "the job names the model it produced");
  await page.screenshot({ path: path.join(shots, "job.png"), fullPage: true });
  step("lineage: model -> job");
  console.log(`console-browser: screenshots in ${shots}`);
} finally {
  await browser.close();
}
