// Drives Debian's Chromium through evtrack's dashboard of one site:
// loads it, clicks a page to filter, changes the range, removes the filter.
// Usage: node dashboard.mjs <dashboard URL> <time zone> [screenshot path]
// Prints a JSON report: what the page showed at each step (raw numbers),
// console errors and failed requests. The caller compares the numbers with
// the query API's answers.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, timezoneId, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
  ],
});
const report = { errors: [], failed: [], steps: [] };
try {
  const context = await browser.newContext({
    timezoneId,
    viewport: { width: 1280, height: 1000 },
    colorScheme: "light",
  });
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "error" && report.errors.push(m.text()));
  page.on("pageerror", (e) => report.errors.push(String(e)));
  page.on("requestfailed", (r) => report.failed.push(`${r.url()}: ${r.failure()?.errorText}`));
  page.on("response", (r) => r.status() >= 400 && report.failed.push(`${r.url()}: ${r.status()}`));

  // What the page shows once every figure and panel has loaded.
  const snap = async (name) => {
    await page.waitForFunction(() => {
      const stats = [...document.querySelectorAll("[data-testid^=stat-]")];
      const panels = [...document.querySelectorAll(".panel")];
      return stats.length === 5 && stats.every((s) => s.textContent !== "…")
        && document.querySelector(".chart svg, .chart .note")
        && panels.length >= 5 && panels.every((p) => !p.textContent.includes("Loading…"));
    }, null, { timeout: 20_000 });
    const state = await page.evaluate(() => {
      const stats = {};
      for (const s of document.querySelectorAll("[data-testid^=stat-]")) {
        stats[s.dataset.testid.slice(5)] = s.dataset.raw === undefined ? null : Number(s.dataset.raw);
      }
      const panels = {};
      for (const p of document.querySelectorAll(".panel[data-testid]")) {
        const list = p.querySelector(".rows");
        panels[p.dataset.testid] = list
          ? {
            dimension: list.dataset.dim,
            rows: [...list.querySelectorAll(".row")].map((r) => [
              r.querySelector(".key").dataset.value,
              ...[...r.querySelectorAll(".nums [data-raw]")].map((n) => Number(n.dataset.raw)),
            ]),
          }
          : { empty: p.querySelector(".empty")?.textContent ?? "" };
      }
      return {
        url: location.pathname + location.search,
        title: document.title,
        period: document.querySelector("[data-testid=period]").value,
        zone: document.querySelector("[data-testid=zone]")?.textContent ?? null,
        filters: [...document.querySelectorAll("[data-testid=filter]")].map((f) => f.textContent.replace(/×$/, "").trim()),
        stats,
        chartPoints: document.querySelectorAll(".chart .point").length,
        panels,
      };
    });
    report.steps.push({ name, ...state });
  };

  await page.goto(url, { waitUntil: "load" });
  await snap("loaded");
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  // The Pages panel as CSV: the file the browser saves.
  const [download] = await Promise.all([
    page.waitForEvent("download", { timeout: 20_000 }),
    page.click("[data-testid=panel-pages] [data-testid=csv]"),
  ]);
  report.csv = { name: download.suggestedFilename(), text: readFileSync(await download.path(), "utf8") };

  // Click a page: the whole dashboard is filtered by it.
  await page.click('[data-testid=panel-pages] button.key[data-value="/pricing"]');
  await page.waitForSelector("[data-testid=filter]");
  await snap("filtered");

  // Another range, with the filter kept.
  await page.selectOption("[data-testid=period]", "day");
  await page.waitForFunction(() => new URL(location.href).searchParams.get("period") === "day");
  await snap("today");

  // Back in history, then the filter removed with the keyboard.
  await page.goBack();
  await page.waitForFunction(() => !new URL(location.href).searchParams.has("period"));
  await snap("back");
  await page.focus("[data-testid=filter] button");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => !document.querySelector("[data-testid=filter]"));
  await snap("unfiltered");
  await context.close();
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
