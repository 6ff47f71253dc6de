// Drives Debian's Chromium through two pages of a shop on another origin:
// one with evtrack's script tag, one with Plausible's npm tracker pointed at
// evtrack. Usage: node run.mjs <shop origin> <screenshot path>
// Prints a JSON report: console errors and failed requests (the caller
// checks what evtrack stored through its query API).
import { chromium } from "playwright-core";

const [shop, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    // The shop's name resolves to loopback, where the test serves it.
    "--host-resolver-rules=MAP shop.test 127.0.0.1",
  ],
});
const report = { errors: [], failed: [], sent: 0, signupStatus: null };
try {
  // An ordinary desktop Chrome: HeadlessChrome is a bot's, and dropped.
  const context = await browser.newContext({
    userAgent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
  });
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "error" && report.errors.push(m.text()));
  page.on("pageerror", (e) => report.errors.push(String(e)));
  page.on("requestfailed", (r) => report.failed.push(`${r.url()}: ${r.failure()?.errorText}`));
  page.on("request", (r) => r.url().endsWith("/api/event") && report.sent++);
  const settle = () => page.waitForTimeout(300);

  await page.goto(`${shop}/tag`, { waitUntil: "load" });
  await settle();
  await page.click("#next");
  await page.click("#signup");
  await page.waitForFunction(() => window.signupStatus != null);
  report.signupStatus = await page.evaluate(() => window.signupStatus);
  await page.click("#out");
  await page.click("#file");
  await settle();
  if (screenshot) await page.screenshot({ path: screenshot });

  // Leaving the page hides it: its engagement is sent on the way out.
  await page.goto(`${shop}/npm`, { waitUntil: "load" });
  await page.waitForFunction(() => typeof window.track === "function");
  await settle();
  await page.click("#next");
  await page.click("#buy");
  await settle();
  await context.close();
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
