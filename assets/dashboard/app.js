// evtrack dashboard: one page, no dependencies, served by the binary.
//
// Everything it shows comes from the public API: `GET /api/sites` (the
// sites the viewer may read), `GET /api/sites/{id}/properties` (property
// keys, for the custom events panel) and `POST /api/v2/query` (every
// figure, chart and panel). The state of a view (site, range, chart
// metric, filters) lives in the URL, so a view can be shared; the site's
// time zone (from the registry), else the viewer's, goes with every query.
"use strict";

(() => {
  const BASE = (document.querySelector('meta[name="evtrack-base"]')?.content || "").replace(/\/$/, "");
  const VIEWER_TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  // The zone of the dates shown and asked: the site's when it has one.
  let TZ = VIEWER_TZ;
  const TOKEN_KEY = "evtrack.token";
  const LIVE_EVERY_MS = 30_000;
  const main = document.getElementById("main");
  const top = document.getElementById("top");

  // ---- small helpers -------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      // Through the CSSOM: the page's CSP allows no inline style attribute.
      else if (k === "style") Object.assign(node.style, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
  const whole = new Intl.NumberFormat();

  function formatMetric(metric, value) {
    if (value === null || value === undefined) return "–";
    switch (metric) {
      case "bounce_rate":
      case "conversion_rate":
        return `${value}%`;
      case "visit_duration":
        return duration(value);
      case "views_per_visit":
        return String(value);
      default:
        return value >= 10_000 ? compact.format(value) : whole.format(value);
    }
  }

  function duration(seconds) {
    const s = Math.round(seconds);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  // ---- dates in the viewer's zone --------------------------------------

  const formatIn = (zone) => new Intl.DateTimeFormat("en-US", {
    timeZone: zone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  let partsFormat = formatIn(TZ);

  /** Dates from now on in `zone` (a site's), or the viewer's. */
  function useZone(zone) {
    let next = zone || VIEWER_TZ;
    try { formatIn(next); } catch (e) { next = VIEWER_TZ; }
    if (next !== TZ) { TZ = next; partsFormat = formatIn(TZ); }
  }

  /** Wall-clock parts of an instant in the viewer's zone. */
  function wall(ms) {
    const p = {};
    for (const { type, value } of partsFormat.formatToParts(new Date(ms))) p[type] = value;
    return { y: +p.year, m: +p.month, d: +p.day, h: +p.hour % 24, min: +p.minute, s: +p.second };
  }

  /** The zone's offset from UTC at an instant, in minutes. */
  function offsetAt(ms) {
    const w = wall(ms);
    const asUtc = Date.UTC(w.y, w.m - 1, w.d, w.h, w.min, w.s);
    return Math.round((asUtc - Math.floor(ms / 1000) * 1000) / 60_000);
  }

  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const dateOf = (y, m, d) => {
    const t = new Date(Date.UTC(y, m - 1, d));
    return `${t.getUTCFullYear()}-${pad(t.getUTCMonth() + 1)}-${pad(t.getUTCDate())}`;
  };
  const splitDate = (s) => s.split("-").map(Number);
  const addDays = (s, n) => { const [y, m, d] = splitDate(s); return dateOf(y, m, d + n); };
  const daysBetween = (a, b) => {
    const [ay, am, ad] = splitDate(a);
    const [by, bm, bd] = splitDate(b);
    return Math.round((Date.UTC(by, bm - 1, bd) - Date.UTC(ay, am - 1, ad)) / 86_400_000);
  };
  const today = () => { const w = wall(Date.now()); return dateOf(w.y, w.m, w.d); };
  const isDate = (s) => /^\d{4}-\d{2}-\d{2}$/.test(s || "") && !Number.isNaN(Date.parse(s));

  /** An instant as the API takes it: local time with the zone's offset. */
  function instant(ms) {
    const whole = Math.floor(ms / 1000) * 1000;
    const off = offsetAt(whole);
    const local = new Date(whole + off * 60_000).toISOString().slice(0, 19);
    const sign = off < 0 ? "-" : "+";
    const a = Math.abs(off);
    return `${local}${sign}${pad(Math.floor(a / 60))}:${pad(a % 60)}`;
  }

  /** The instant a wall-clock time of a date has in the viewer's zone. */
  function instantOf(date, secondOfDay) {
    const [y, m, d] = splitDate(date);
    const naive = Date.UTC(y, m - 1, d) + secondOfDay * 1000;
    let t = naive - offsetAt(naive) * 60_000;
    t = naive - offsetAt(t) * 60_000;
    return t;
  }

  const PERIODS = [
    ["day", "Today"],
    ["yesterday", "Yesterday"],
    ["7d", "Last 7 days"],
    ["30d", "Last 30 days"],
    ["month", "Month to date"],
    ["lastmonth", "Last month"],
    ["12mo", "Last 12 months"],
    ["custom", "Custom range"],
  ];

  /** The dates a period covers, both included, and the chart's grain. */
  function periodRange(state) {
    const t = today();
    const [y, m] = splitDate(t);
    let from, to;
    switch (state.period) {
      case "day": from = to = t; break;
      case "yesterday": from = to = addDays(t, -1); break;
      case "7d": from = addDays(t, -6); to = t; break;
      case "month": from = dateOf(y, m, 1); to = t; break;
      case "lastmonth": from = dateOf(y, m - 1, 1); to = dateOf(y, m, 0); break;
      case "12mo": from = dateOf(y, m - 11, 1); to = t; break;
      case "custom":
        from = state.from; to = state.to;
        if (!isDate(from) || !isDate(to)) { from = addDays(t, -29); to = t; }
        if (to < from) [from, to] = [to, from];
        break;
      default: from = addDays(t, -29); to = t;
    }
    const days = daysBetween(from, to) + 1;
    const grain = days <= 1 ? "time:hour" : days <= 92 ? "time:day" : "time:month";
    return { from, to, days, grain, live: to >= t };
  }

  /** The previous period of the same length; for a range that runs to
   *  now, it ends at the same time of day, so that a partial today is
   *  compared with as much of the day before. */
  function previousRange(range) {
    const from = addDays(range.from, -range.days);
    if (!range.live) return [from, addDays(range.to, -range.days)];
    const w = wall(Date.now());
    const seconds = w.h * 3600 + w.min * 60 + w.s;
    return [instant(instantOf(from, 0)), instant(instantOf(addDays(range.to, -range.days), seconds))];
  }

  // ---- state in the URL ------------------------------------------------

  const DIM_LABELS = {
    "event:page": "Page",
    "event:name": "Event",
    "event:goal": "Goal",
    "visit:source": "Source",
    "visit:referrer": "Referrer",
    "visit:utm_source": "UTM source",
    "visit:utm_medium": "UTM medium",
    "visit:utm_campaign": "UTM campaign",
    "visit:country": "Country",
    "visit:device": "Device",
    "visit:browser": "Browser",
    "visit:os": "Operating system",
    "visit:entry_page": "Entry page",
    "visit:exit_page": "Exit page",
  };
  const labelOf = (dim) =>
    DIM_LABELS[dim] || (dim.startsWith("event:props:") ? `Property ${dim.slice(12)}` : dim);

  function readState() {
    const path = location.pathname.slice(BASE.length);
    const match = path.match(/^\/dashboard\/(.+)$/);
    const q = new URLSearchParams(location.search);
    const filters = q.getAll("f").map((f) => {
      // `dimension|operator|value`: the value may hold anything, even `|`.
      const a = f.indexOf("|");
      const b = f.indexOf("|", a + 1);
      if (a < 0 || b < 0) return null;
      return [f.slice(a + 1, b), f.slice(0, a), f.slice(b + 1)];
    }).filter((f) => f && ["is", "is_not", "contains"].includes(f[0]));
    return {
      site: match ? decodeURIComponent(match[1]) : null,
      period: PERIODS.some(([p]) => p === q.get("period")) ? q.get("period") : "30d",
      from: q.get("from"),
      to: q.get("to"),
      metric: q.get("metric") || "visitors",
      filters,
      auth: q.get("auth"),
    };
  }

  function urlOf(state) {
    const q = new URLSearchParams();
    if (state.period !== "30d") q.set("period", state.period);
    if (state.period === "custom") { q.set("from", state.from); q.set("to", state.to); }
    if (state.metric !== "visitors") q.set("metric", state.metric);
    for (const [op, dim, value] of state.filters) q.append("f", `${dim}|${op}|${value}`);
    if (state.auth) q.set("auth", state.auth);
    const s = q.toString();
    return `${BASE}/dashboard/${encodeURIComponent(state.site)}${s ? `?${s}` : ""}`;
  }

  function go(state, replace) {
    const url = urlOf(state);
    if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
    render();
  }

  // ---- the API -----------------------------------------------------------

  function token() {
    return readState().auth || localStorage.getItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, body) {
    const headers = { accept: "application/json" };
    const t = token();
    if (t) headers.authorization = `Bearer ${t}`;
    if (body) headers["content-type"] = "application/json";
    let response;
    try {
      response = await fetch(BASE + path, {
        method: body ? "POST" : "GET",
        headers,
        body: body ? JSON.stringify(body) : undefined,
      });
    } catch (e) {
      throw new ApiError(0, "network", "evtrack could not be reached");
    }
    const json = await response.json().catch(() => null);
    if (!response.ok) {
      const err = json && json.error ? json.error : {};
      throw new ApiError(response.status, err.code || "error", err.message || response.statusText);
    }
    return json;
  }

  /** A panel's whole breakdown (up to 10,000 rows) as a CSV file the
   *  browser saves: the query API's own CSV answer (`Accept: text/csv`). */
  async function downloadCsv(state, range, tab, button) {
    const headers = { accept: "text/csv", "content-type": "application/json" };
    const t = token();
    if (t) headers.authorization = `Bearer ${t}`;
    const filters = state.filters.map(([op, dim, value]) => [op, dim, [value]]);
    button.disabled = true;
    try {
      const response = await fetch(BASE + "/api/v2/query", {
        method: "POST",
        headers,
        body: JSON.stringify({
          site_id: state.site,
          date_range: [range.from, range.to],
          timezone: TZ,
          metrics: tab.metrics,
          dimensions: [tab.dim],
          filters: [...filters, ...(tab.filters || [])],
        }),
      });
      if (!response.ok) throw new Error(response.statusText);
      const blob = new Blob([await response.text()], { type: "text/csv" });
      const link = el("a", {
        href: URL.createObjectURL(blob),
        download: `${state.site}-${tab.dim.replace(/\W+/g, "-")}-${range.from.slice(0, 10)}-${range.to.slice(0, 10)}.csv`,
      });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    } catch (e) {
      button.title = `Export failed: ${e.message}`;
    } finally {
      button.disabled = false;
    }
  }

  function query(state, range, extra) {
    const filters = state.filters.map(([op, dim, value]) => [op, dim, [value]]);
    return api("/api/v2/query", {
      site_id: state.site,
      date_range: [range.from, range.to],
      timezone: TZ,
      ...extra,
      filters: [...filters, ...(extra.filters || [])],
    });
  }

  // ---- pages -------------------------------------------------------------

  let generation = 0; // a newer render makes older answers stale
  let liveTimer = null;

  function render() {
    generation += 1;
    clearInterval(liveTimer);
    const state = readState();
    for (const n of [...top.children].slice(1)) n.remove();
    main.replaceChildren();
    if (state.site) dashboard(state); else siteList();
  }

  function tokenForm(message) {
    const input = el("input", { type: "password", autocomplete: "off", "aria-label": "Read token", placeholder: "Read token" });
    const form = el("form", {
      class: "token-form",
      onsubmit: (e) => {
        e.preventDefault();
        if (input.value.trim()) localStorage.setItem(TOKEN_KEY, input.value.trim());
        render();
      },
    }, input, el("button", { class: "button primary", type: "submit" }, "Open"));
    const forget = localStorage.getItem(TOKEN_KEY)
      ? el("button", { class: "button", type: "button", onclick: () => { localStorage.removeItem(TOKEN_KEY); render(); } }, "Forget the saved token")
      : null;
    return el("section", { class: "card list" },
      el("h1", {}, "A read token is needed"),
      el("p", { class: "muted" }, message,
        " It is kept in this browser only and sent with each query."),
      form, forget);
  }

  async function siteList() {
    document.title = "evtrack";
    const mine = generation;
    let sites;
    try {
      sites = (await api("/api/sites")).sites;
    } catch (e) {
      if (mine !== generation) return;
      if (e.status === 401 || e.status === 403) { main.append(tokenForm("This evtrack needs a token to read its sites.")); return; }
      main.append(el("p", { class: "error" }, e.message));
      return;
    }
    if (mine !== generation) return;
    if (!sites.length) {
      const origin = location.origin + BASE;
      main.append(el("section", { class: "card list" },
        el("h1", {}, "No events yet"),
        el("p", {}, "evtrack is running. Send it an event and its site shows here."),
        el("p", {}, "On a web page, add the tracker (the site id is the page's host name by default):"),
        el("pre", {}, `<script defer data-domain="example.com" src="${origin}/js/script.js"></script>`),
        el("p", {}, "Or send one from a shell:"),
        el("pre", {}, `curl -X POST ${origin}/event -H 'content-type: application/json' \\\n  -d '{"site_id":"example.com","event_type":"page_view","path":"/","userid":"u1"}'`),
        el("p", { class: "muted" }, "Then reload this page.")));
      return;
    }
    const list = el("ul", {});
    for (const s of sites) {
      const link = el("a", { href: `${BASE}/dashboard/${encodeURIComponent(s.site_id)}` },
        el("span", { class: "name" }, s.site_id),
        el("span", { class: "muted", "data-visitors": s.site_id }, ""));
      list.append(el("li", {}, link));
    }
    main.append(el("section", { class: "card list" }, el("h1", {}, "Sites"), list));
    // Visitors of the last 30 days beside each site, when they come.
    const range = periodRange({ period: "30d" });
    for (const s of sites) {
      query({ site: s.site_id, filters: [] }, range, { metrics: ["visitors"] })
        .then((a) => {
          if (mine !== generation) return;
          const cell = main.querySelector(`[data-visitors="${CSS.escape(s.site_id)}"]`);
          if (cell) cell.textContent = `${formatMetric("visitors", a.results[0].metrics[0])} visitors in 30 days`;
        })
        .catch(() => {});
    }
  }

  const HEADLINE = [
    ["visitors", "Unique visitors", "event"],
    ["pageviews", "Pageviews", "event"],
    ["visits", "Visits", "visit"],
    ["bounce_rate", "Bounce rate", "visit"],
    ["visit_duration", "Visit duration", "visit"],
  ];
  const LOWER_IS_BETTER = new Set(["bounce_rate"]);

  /** What the listing says of each site (time zone, goals), read once. */
  let sitesAnswer = null;
  function siteInfo(site) {
    sitesAnswer = sitesAnswer || api("/api/sites").catch((e) => { sitesAnswer = null; throw e; });
    return sitesAnswer.then((a) => a.sites.find((s) => s.site_id === site) || null);
  }

  async function dashboard(state) {
    const mine = generation;
    let info = null;
    try {
      info = await siteInfo(state.site);
    } catch (e) {
      if (mine !== generation) return;
      if (e.status === 401 || e.status === 403) { main.append(tokenForm("This dashboard needs a read token.")); return; }
    }
    if (mine !== generation) return;
    useZone(info && info.timezone);
    const range = periodRange(state);
    document.title = `${state.site} · evtrack`;

    // Header: site, live visitors, range controls.
    const live = el("span", { class: "live", "aria-live": "polite" }, el("span", { class: "dot", "aria-hidden": "true" }), el("span", { "data-testid": "live" }, "…"));
    const select = el("select", {
      "aria-label": "Date range",
      "data-testid": "period",
      onchange: () => {
        const next = { ...state, period: select.value };
        if (select.value === "custom") { next.from = range.from; next.to = range.to; }
        go(next);
      },
    }, PERIODS.map(([value, label]) => el("option", { value, selected: value === state.period }, label)));
    const controls = el("div", { class: "range" }, select);
    if (state.period === "custom") {
      const from = el("input", { type: "date", value: range.from, "aria-label": "From", max: today() });
      const to = el("input", { type: "date", value: range.to, "aria-label": "To", max: today() });
      const apply = () => { if (isDate(from.value) && isDate(to.value)) go({ ...state, from: from.value, to: to.value }); };
      from.addEventListener("change", apply);
      to.addEventListener("change", apply);
      controls.append(from, to);
    }
    const zone = el("span", { class: "muted zone", title: "Dates and times are in this time zone", "data-testid": "zone" }, TZ);
    top.append(el("span", { class: "site-name" }, state.site), live, el("span", { class: "spacer" }), zone, controls);

    // Filters, each removable.
    const chips = el("div", { class: "filters", "aria-label": "Filters" });
    state.filters.forEach(([op, dim, value], i) => {
      const words = { is: "is", is_not: "is not", contains: "contains" }[op];
      chips.append(el("span", { class: "chip", "data-testid": "filter" },
        `${labelOf(dim)} ${words} `, el("strong", {}, value),
        el("button", {
          type: "button",
          "aria-label": `Remove filter ${labelOf(dim)} ${words} ${value}`,
          onclick: () => go({ ...state, filters: state.filters.filter((_, j) => j !== i) }),
        }, "×")));
    });
    main.append(chips);

    // Headline figures and the chart.
    const stats = el("div", { class: "headline", role: "group", "aria-label": "Totals" });
    const chart = el("div", { class: "chart" });
    main.append(el("section", { class: "card", "aria-label": "Overview" }, stats, chart));
    const cells = {};
    for (const [metric, label] of HEADLINE) {
      const value = el("span", { class: "value", "data-testid": `stat-${metric}` }, "…");
      const change = el("span", { class: "change", "data-testid": `change-${metric}` }, "\u00a0");
      const button = el("button", {
        class: "stat",
        type: "button",
        "aria-pressed": String(state.metric === metric),
        title: `Chart ${label.toLowerCase()}`,
        onclick: () => go({ ...state, metric }, true),
      }, el("span", { class: "label" }, label), value, change);
      cells[metric] = { value, change, button };
      stats.append(button);
    }
    headline(state, range, cells, mine);
    drawChart(state, range, chart, mine);

    // Panels.
    const panels = el("div", { class: "panels" });
    main.append(panels);
    const PANELS = [
      ["Pages", [
        { label: "Top pages", dim: "event:page", metrics: ["visitors", "pageviews"], filters: [["is", "event:name", ["pageview"]]] },
        { label: "Entry pages", dim: "visit:entry_page", metrics: ["visitors", "visits"] },
        { label: "Exit pages", dim: "visit:exit_page", metrics: ["visitors", "visits"] },
      ]],
      ["Sources", [
        { label: "Sources", dim: "visit:source", metrics: ["visitors", "visits"] },
        { label: "Referrers", dim: "visit:referrer", metrics: ["visitors", "visits"] },
        { label: "Campaigns", dim: "visit:utm_campaign", metrics: ["visitors", "visits"] },
        { label: "UTM sources", dim: "visit:utm_source", metrics: ["visitors", "visits"] },
        { label: "UTM mediums", dim: "visit:utm_medium", metrics: ["visitors", "visits"] },
      ]],
      ["Countries", [
        { label: "Countries", dim: "visit:country", metrics: ["visitors", "visits"], show: countryName },
      ]],
      ["Devices", [
        { label: "Devices", dim: "visit:device", metrics: ["visitors", "visits"] },
        { label: "Browsers", dim: "visit:browser", metrics: ["visitors", "visits"] },
        { label: "Operating systems", dim: "visit:os", metrics: ["visitors", "visits"] },
      ]],
    ];
    for (const [title, tabs] of PANELS) panels.append(panel(state, range, title, tabs, mine));
    if (info && info.goals && info.goals.length) {
      panels.append(panel(state, range, "Goals", [
        { label: "Goals", dim: "event:goal", metrics: ["visitors", "events", "conversion_rate"] },
      ], mine, "panel-goals"));
    }
    panels.append(eventsPanel(state, range, mine));

    if (range.live) {
      const tick = () => liveVisitors(state, live.lastChild, mine);
      tick();
      liveTimer = setInterval(tick, LIVE_EVERY_MS);
    } else {
      live.remove();
    }
  }

  async function liveVisitors(state, out, mine) {
    const now = Date.now();
    try {
      const a = await api("/api/v2/query", {
        site_id: state.site,
        metrics: ["visitors"],
        date_range: [instant(now - 5 * 60_000), instant(now)],
        timezone: TZ,
      });
      if (mine !== generation) return;
      const n = a.results[0].metrics[0];
      out.textContent = `${whole.format(n)} current visitor${n === 1 ? "" : "s"}`;
      out.parentElement.title = "Visitors in the last 5 minutes";
    } catch (e) {
      if (mine === generation) out.textContent = "";
    }
  }

  /** Totals in two queries (event metrics, visit metrics), now and in the
   *  previous period. */
  async function headline(state, range, cells, mine) {
    const [prevFrom, prevTo] = previousRange(range);
    const prev = { from: prevFrom, to: prevTo };
    const groups = ["event", "visit"].map((kind) => HEADLINE.filter((h) => h[2] === kind).map((h) => h[0]));
    await Promise.all(groups.map(async (metrics) => {
      let now, before;
      try {
        [now, before] = await Promise.all([
          query(state, range, { metrics }),
          query(state, prev, { metrics }).catch(() => null),
        ]);
      } catch (e) {
        if (mine !== generation) return;
        for (const m of metrics) {
          cells[m].value.textContent = "–";
          cells[m].change.textContent = e.code === "unsupported_query" ? "not with this filter" : "";
          cells[m].button.title = e.message;
        }
        return;
      }
      if (mine !== generation) return;
      // Rates and durations of a previous period without visits compare
      // with nothing.
      const visitsBefore = before && metrics[0] === "visits" ? before.results[0]?.metrics[0] ?? 0 : null;
      metrics.forEach((m, i) => {
        const v = now.results[0]?.metrics[i] ?? 0;
        let p = before ? before.results[0]?.metrics[i] ?? 0 : null;
        if (visitsBefore === 0 && m !== "visits") p = 0;
        cells[m].value.textContent = formatMetric(m, v);
        cells[m].value.dataset.raw = String(v);
        const c = cells[m].change;
        if (p === null) { c.textContent = "\u00a0"; return; }
        let text, better;
        if (p === 0 && visitsBefore === 0) {
          text = v === 0 ? "no change" : "new"; better = true;
        } else if (m === "bounce_rate") {
          const d = Math.round(v - p);
          text = d === 0 ? "no change" : `${d > 0 ? "↑" : "↓"} ${Math.abs(d)} pts`;
          better = d < 0;
        } else if (p === 0) {
          text = v === 0 ? "no change" : "new"; better = v > 0;
        } else {
          const pct = Math.round(((v - p) / p) * 100);
          text = pct === 0 ? "no change" : `${pct > 0 ? "↑" : "↓"} ${Math.abs(pct)}%`;
          better = LOWER_IS_BETTER.has(m) ? pct < 0 : pct > 0;
        }
        c.textContent = text;
        c.className = `change ${text === "no change" ? "" : better ? "up" : "down"}`;
        c.title = `Previous period: ${formatMetric(m, p)}`;
      });
    }));
  }

  function labelTime(grain, label) {
    const [y, m, d] = splitDate(label.slice(0, 10));
    const date = new Date(Date.UTC(y, m - 1, d));
    const opts = { timeZone: "UTC" };
    if (grain === "time:hour") return label.slice(11, 16);
    if (grain === "time:month") return date.toLocaleDateString(undefined, { ...opts, month: "short", year: "numeric" });
    return date.toLocaleDateString(undefined, { ...opts, month: "short", day: "numeric" });
  }

  async function drawChart(state, range, box, mine) {
    const metric = HEADLINE.some(([m]) => m === state.metric) ? state.metric : "visitors";
    let answer;
    try {
      answer = await query(state, range, {
        metrics: [metric],
        dimensions: [range.grain],
        include: { time_labels: true },
      });
    } catch (e) {
      if (mine === generation) box.append(el("p", { class: "note" }, e.code === "unsupported_query" ? "This metric cannot be charted with these filters." : e.message));
      return;
    }
    if (mine !== generation) return;
    const byLabel = new Map(answer.results.map((r) => [r.dimensions[0], r.metrics[0]]));
    const labels = answer.meta.time_labels || [...byLabel.keys()];
    const values = labels.map((l) => byLabel.get(l) ?? 0);
    // Drawn at the box's own size, so that text keeps its proportions.
    const narrow = window.matchMedia("(max-width: 760px)").matches;
    const W = Math.max(280, Math.round(box.getBoundingClientRect().width) - 32);
    const H = narrow ? 200 : 260, L = 44, R = 12, T = 12, B = 28;
    const max = Math.max(1, ...values);
    const step = niceStep(max / 4);
    const yMax = Math.ceil(max / step) * step;
    const x = (i) => L + (labels.length <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (labels.length - 1));
    const y = (v) => T + (H - T - B) * (1 - v / yMax);
    const NS = "http://www.w3.org/2000/svg";
    const s = (tag, attrs, ...kids) => {
      const n = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
      n.append(...kids);
      return n;
    };
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `${HEADLINE.find(([m]) => m === metric)[1]} by ${range.grain.slice(5)}` });
    const grid = s("g", { class: "grid" });
    const axis = s("g", { class: "axis" });
    for (let v = 0; v <= yMax; v += step) {
      grid.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      axis.append(s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, formatMetric(metric, v)));
    }
    const every = Math.max(1, Math.ceil(labels.length / Math.max(2, Math.floor(W / 90))));
    labels.forEach((l, i) => {
      if (i % every === 0) axis.append(s("text", { x: x(i), y: H - 8, "text-anchor": "middle" }, labelTime(range.grain, l)));
    });
    const points = values.map((v, i) => `${x(i)},${y(v)}`);
    svg.append(grid, axis);
    if (points.length) {
      svg.append(s("path", { class: "area", d: `M${x(0)},${y(0)} L${points.join(" L")} L${x(values.length - 1)},${y(0)} Z` }));
      svg.append(s("path", { class: "line", d: `M${points.join(" L")}`, "vector-effect": "non-scaling-stroke" }));
    }
    const tip = el("div", { class: "tip", hidden: true });
    values.forEach((v, i) => {
      const text = `${labelTime(range.grain, labels[i])}${range.grain === "time:hour" ? ` ${labels[i].slice(0, 10)}` : ""}: ${formatMetric(metric, v)}`;
      const hit = s("rect", { class: "hit", x: x(i) - 8, y: T, width: 16, height: H - T - B, tabindex: labels.length <= 40 ? "0" : "-1", "aria-label": text },
        s("title", {}, text));
      const show = () => {
        const rect = svg.getBoundingClientRect();
        tip.hidden = false;
        tip.textContent = text;
        tip.style.left = `${(x(i) / W) * rect.width + 16}px`;
        tip.style.top = `${(y(v) / H) * rect.height + 12}px`;
      };
      hit.addEventListener("mouseenter", show);
      hit.addEventListener("focus", show);
      hit.addEventListener("mouseleave", () => { tip.hidden = true; });
      hit.addEventListener("blur", () => { tip.hidden = true; });
      svg.append(hit, s("circle", { class: "point", cx: x(i), cy: y(v), r: labels.length <= 40 ? 3.5 : 0, "vector-effect": "non-scaling-stroke" }));
    });
    box.append(svg, tip);
  }

  function niceStep(raw) {
    if (raw <= 1) return 1;
    const p = 10 ** Math.floor(Math.log10(raw));
    for (const f of [1, 2, 2.5, 5, 10]) if (f * p >= raw) return f * p;
    return 10 * p;
  }

  const regionNames = typeof Intl.DisplayNames === "function" ? new Intl.DisplayNames(undefined, { type: "region" }) : null;
  function countryName(code) {
    if (!/^[A-Z]{2}$/.test(code)) return code;
    // Names, not flags: a system without an emoji font shows boxes.
    try { return regionNames?.of(code) || code; } catch (e) { return code; }
  }

  const METRIC_LABELS = { visitors: "Visitors", pageviews: "Pageviews", visits: "Visits", events: "Events", conversion_rate: "CR" };

  /** A card of tabs, each a breakdown by one dimension; clicking a value
   *  filters the whole dashboard by it. */
  function panel(state, range, title, tabs, mine, testid) {
    const body = el("div", {});
    const tabBar = el("div", { class: "tabs", role: "tablist", "aria-label": title });
    let current = tabs[0];
    const csv = el("button", {
      class: "csv",
      type: "button",
      title: `Download ${title} as CSV`,
      "aria-label": `Download ${title} as CSV`,
      "data-testid": "csv",
      onclick: () => downloadCsv(state, range, current, csv),
    }, "CSV");
    const section = el("section", { class: "card panel", "aria-label": title, "data-testid": testid || `panel-${title.toLowerCase().replace(/\W+/g, "-")}` },
      el("div", { class: "panel-head" }, el("div", { class: "panel-title" }, el("h2", {}, title), csv), tabs.length > 1 ? tabBar : null), body);
    const show = (tab, limit) => {
      current = tab;
      for (const b of tabBar.children) b.setAttribute("aria-selected", String(b.dataset.dim === tab.dim && b.textContent === tab.label));
      breakdown(state, range, tab, body, mine, limit);
    };
    for (const tab of tabs) {
      tabBar.append(el("button", { type: "button", role: "tab", "data-dim": tab.dim, onclick: () => show(tab, 10) }, tab.label));
    }
    show(tabs[0], 10);
    return section;
  }

  async function breakdown(state, range, tab, body, mine, limit) {
    body.replaceChildren(el("p", { class: "empty" }, "Loading…"));
    let answer;
    try {
      answer = await query(state, range, {
        metrics: tab.metrics,
        dimensions: [tab.dim],
        filters: tab.filters || [],
        pagination: { limit: limit + 1 },
      });
    } catch (e) {
      if (mine !== generation) return;
      body.replaceChildren(el("p", { class: "empty" }, e.code === "unsupported_query" ? "Not available with these filters." : e.message));
      return;
    }
    if (mine !== generation) return;
    const rows = answer.results.slice(0, limit);
    if (!rows.length) { body.replaceChildren(el("p", { class: "empty" }, "No data for this range.")); return; }
    const max = Math.max(1, ...rows.map((r) => r.metrics[0]));
    const filtered = state.filters.some(([, dim]) => dim === tab.dim);
    const list = el("ul", { class: "rows", "data-dim": tab.dim });
    for (const r of rows) {
      const value = r.dimensions[0];
      const shown = tab.show ? tab.show(value) : value;
      list.append(el("li", { class: "row" },
        el("span", { class: "bar", style: { width: `${(100 * r.metrics[0]) / max}%` } }),
        el("button", {
          class: "key",
          type: "button",
          title: `Filter by ${labelOf(tab.dim)} ${value}`,
          "data-value": value,
          disabled: filtered,
          onclick: () => go({ ...state, filters: [...state.filters, ["is", tab.dim, value]] }),
        }, shown),
        el("span", { class: "nums" }, r.metrics.map((m, i) => el("span", { "data-metric": tab.metrics[i], "data-raw": String(m) }, formatMetric(tab.metrics[i], m))))));
    }
    const head = el("div", { class: "cols" }, el("span", {}, tab.label), el("span", { class: "nums" }, tab.metrics.map((m) => el("span", {}, METRIC_LABELS[m] || m))));
    body.replaceChildren(head, list);
    if (answer.results.length > limit) {
      body.append(el("button", { class: "more", type: "button", onclick: () => breakdown(state, range, tab, body, mine, 100) }, "Show more"));
    }
  }

  /** Custom events; with one event chosen as a filter, its properties. */
  function eventsPanel(state, range, mine) {
    const chosen = state.filters.find(([op, dim]) => op === "is" && dim === "event:name");
    const tabs = [{
      label: "Custom events",
      dim: "event:name",
      metrics: ["visitors", "events"],
      filters: [["is_not", "event:name", ["pageview"]]],
    }];
    const section = panel(state, range, "Custom events", tabs, mine, "panel-events");
    if (!chosen) return section;
    const props = el("div", {});
    section.append(props);
    api(`/api/sites/${encodeURIComponent(state.site)}/properties?event=${encodeURIComponent(chosen[2])}`)
      .then((a) => {
        if (mine !== generation || !a.properties.length) return;
        const sub = panel(state, range, `Properties of ${chosen[2]}`,
          a.properties.map((key) => ({ label: key, dim: `event:props:${key}`, metrics: ["visitors", "events"] })), mine, "panel-properties");
        sub.classList.remove("card");
        sub.style.padding = "0.75rem 0 0";
        props.append(sub);
      })
      .catch(() => {});
    return section;
  }

  window.addEventListener("popstate", render);
  render();
})();
