// The whole journey in a real browser (Chromium through playwright-core), against the built app,
// the functions, a Stripe stand-in and a fake OpenAI-compatible upstream that `scripts/e2e`
// starts. Each step leaves a screenshot in E2E_SCREENSHOTS; on failure the page's console is
// printed and the exit code is 1.
//
// Env: E2E_APP_URL (the app), E2E_STRIPE_URL (the Stripe stand-in, whose pay page the purchase
// must pass through), E2E_SCREENSHOTS (folder), CHROMIUM (default /usr/bin/chromium).

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const app = process.env.E2E_APP_URL ?? "http://127.0.0.1:3310";
const stripe = process.env.E2E_STRIPE_URL ?? "http://127.0.0.1:12311";
const shots = process.env.E2E_SCREENSHOTS ?? "e2e-screenshots";
const TIMEOUT = 30_000;

mkdirSync(shots, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "e2e-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // The closed network refuses Chromium's own background connections; without these flags it
  // keeps retrying them.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1000, height: 760 },
});
context.setDefaultTimeout(TIMEOUT);
const page = context.pages()[0] ?? (await context.newPage());
const consoleLines = [];
page.on("console", (m) => consoleLines.push(`[console.${m.type()}] ${m.text()}`));
page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.message}`));
page.on("requestfailed", (r) => consoleLines.push(`[requestfailed] ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
const visited = [];
page.on("request", (r) => r.isNavigationRequest() && visited.push(r.url()));

let passed = 0;
let number = 0;
async function step(name, run) {
  number += 1;
  const file = join(shots, `${String(number).padStart(2, "0")}-${name.replace(/[^a-z0-9]+/gi, "-").toLowerCase()}.png`);
  const started = Date.now();
  try {
    await run();
  } catch (error) {
    await page.screenshot({ path: file.replace(/\.png$/, "-FAILED.png"), fullPage: true }).catch(() => {});
    console.log(`FAIL ${name}: ${error.message}`);
    console.log(`page: ${page.url()}\n--- the page's console ---\n${consoleLines.join("\n") || "(empty)"}`);
    console.log(`${passed} passed, 1 failed`);
    await context.close();
    rmSync(profile, { recursive: true, force: true });
    process.exit(1);
  }
  await page.screenshot({ path: file, fullPage: true });
  passed += 1;
  console.log(`ok   ${name} (${Date.now() - started} ms)`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const answers = page.getByTestId("chat-message-assistant");

/** Runs `action` and waits until the chat request it starts has ended. */
async function untilAnswered(action) {
  const ended = Number(await page.getByTestId("chat-messages").getAttribute("data-ended"));
  await action();
  await page.locator(`[data-testid="chat-messages"][data-ended="${ended + 1}"]`).waitFor();
  const error = page.getByTestId("chat-error");
  if ((await error.count()) > 0) throw new Error(`the chat showed an error: ${await error.textContent()}`);
}

/** Asks a question and returns answer number `index` (0-based) once it is complete. */
async function ask(question, index) {
  await untilAnswered(async () => {
    await page.getByTestId("chat-input").fill(question);
    await page.getByTestId("chat-send").click();
  });
  return (await answers.nth(index).textContent()).trim();
}

/** Records every text the answers take while they stream, to prove they arrive in pieces. */
async function watchAnswers() {
  await page.evaluate(() => {
    window.__seen = new Set();
    new MutationObserver(() => {
      for (const el of document.querySelectorAll('[data-testid="chat-message-assistant"]')) {
        window.__seen.add(el.textContent);
      }
    }).observe(document.body, { subtree: true, childList: true, characterData: true });
  });
}

await step("sign in with the dev token", async () => {
  await page.goto(`${app}/chat`);
  await page.getByTestId("sign-in").click();
  await page.getByTestId("chat-input").waitFor();
});

await step("useChat's resume probe through the rewrite: nothing to resume", async () => {
  const status = await page.evaluate(async (token) => {
    const response = await fetch("/api/llm/chat/some-chat-id/stream", { headers: { authorization: `Bearer ${token}` } });
    return response.status;
  }, await page.evaluate(() => Object.entries(localStorage).find(([k]) => k.endsWith("dev-access-token"))?.[1]));
  check(status === 204, `GET /api/llm/chat/{id}/stream answered ${status}`);
});

await step("ask a question: the answer streams in", async () => {
  await watchAnswers();
  const answer = await ask("Hello from the browser", 0);
  check(answer === "echo: Hello from the browser", `answer was ${JSON.stringify(answer)}`);
  const seen = await page.evaluate(() => [...window.__seen]);
  check(seen.length >= 3, `the answer appeared in ${seen.length} piece(s), not streamed: ${JSON.stringify(seen)}`);
  check((await page.getByTestId("chat-answer").first().getAttribute("data-source")) === "llm", "source llm");
});

await step("ask again: the history reaches the model", async () => {
  const answer = await ask("RECALL my first question", 1);
  check(answer === "recall: Hello from the browser", `answer was ${JSON.stringify(answer)}`);
});

await step("regenerate: a fresh answer, not the cached one", async () => {
  await untilAnswered(() => page.getByTestId("chat-regenerate").click());
  check((await answers.count()) === 2, `expected 2 answers, saw ${await answers.count()}`);
  check((await answers.nth(1).textContent()).trim() === "recall: Hello from the browser", "regenerated text");
  check((await page.getByTestId("chat-answer").nth(1).getAttribute("data-source")) === "llm", "regenerated by the LLM");
});

await step("buy the report: Stripe's pay page, then the success page shows paid", async () => {
  await page.goto(`${app}/report`);
  await page.getByTestId("buy-report").click();
  await page.waitForURL(/\/report\/success\?session_id=cs_/);
  check(
    visited.some((url) => url.startsWith(`${stripe}/pay/cs_`)),
    `the purchase did not pass through the Stripe stand-in's pay page: ${visited.join(", ")}`,
  );
  const status = page.getByTestId("order-status");
  await page.locator('[data-testid="order-status"][data-status="paid"]').waitFor();
  check((await status.textContent()).includes("paid"), `status: ${await status.textContent()}`);
});

await step("buy again: already paid", async () => {
  await page.goto(`${app}/report`);
  await page.getByTestId("buy-report").click();
  const message = page.locator('[data-testid="checkout-message"][data-code="already_paid"]');
  await message.waitFor();
  check((await message.textContent()).includes("already own"), `message: ${await message.textContent()}`);
});

await step("the model fails: an automatic answer, marked as such", async () => {
  await page.goto(`${app}/chat`);
  const answer = await ask("FAIL: how much is the full report?", 0);
  check(answer.includes("one-time purchase"), `answer was ${JSON.stringify(answer)}`);
  check((await page.getByTestId("chat-answer").first().getAttribute("data-source")) === "rules", "source rules");
  await page.getByTestId("answer-automatic").waitFor();
});

console.log(`${passed} passed, 0 failed`);
await context.close();
rmSync(profile, { recursive: true, force: true });
