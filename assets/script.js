// evtrack's tracker: <script defer data-domain="example.com" src="https://evtrack.example/js/script.js"></script>
// Options on the tag: data-api (the endpoint; default: api/event beside js/), data-hash (hash-based routing),
// data-include-localhost, data-outbound-links, data-file-downloads.
// No cookies, nothing stored. Served minified (scripts/build-tracker.sh).
((w, d) => {
let s = d.currentScript, D = s.dataset, l = w.location, E = "engagement",
on = (o, e, f) => o.addEventListener(e, f),
api = D.api || new URL("../api/event", s.src), dom = D.domain || l.hostname,
hash = "hash" in D, page, url, shown, ms = 0, depth = 0;
let send = (name, o = {}) => {
let done = r => o.callback?.(r), p;
// Nothing from a developer's machine, and nothing from a visitor who opted out.
try {
if (!("includeLocalhost" in D) && (/^localhost$|^127\.|^\[::1\]$/.test(l.hostname) || l.protocol == "file:") || localStorage.evtrack_ignore == "true") return done({ status: 0 })
} catch (e) {}
// The URL of the page viewed last: for engagement, the page just left.
p = { n: name, u: url, d: dom, r: d.referrer, p: o.props };
if (hash) p.h = 1;
if (o.interactive === false) p.i = false;
if (name == E) p.sd = depth, p.e = ms;
p = JSON.stringify(p);
// A beacon outlives the page; fetch with keepalive when the browser refuses
// it, or when the caller waits for the answer.
o.callback || !navigator.sendBeacon(api, p) ? fetch(api, { method: "POST", body: p, keepalive: true }).then(r => done({ status: r.status }), e => done({ error: e })) : 0
};
// Time the page was visible, and how far down it was read (the server
// caps it at 100).
let tick = (t = Date.now()) => { shown && (ms += t - shown); shown = d.hidden ? 0 : t };
let scroll = () => { depth = Math.max(depth, (w.scrollY + w.innerHeight) / d.documentElement.scrollHeight * 100 | 0) };
let engaged = () => { tick(); ms > 0 && send(E); ms = 0 };
let view = () => {
let here = l.pathname + (hash ? l.hash : "");
if (here != page) { page && engaged(); page = here; url = l.href; depth = 0; scroll(); send("pageview") }
};
on(d, "visibilitychange", () => d.hidden ? engaged() : tick());
on(w, "scroll", scroll);
// Single-page apps: every change of the path is a pageview.
for (let m of ["pushState", "replaceState"]) { let f = history[m]; history[m] = function() { f.apply(this, arguments); view() } }
on(w, "popstate", view);
hash && on(w, "hashchange", view);
// Links out of the site and files, when the tag asks.
let click = e => {
let t = e.target.closest("a[href]"), u, p;
// A click, or a middle click (auxclick with button 1); not a right click.
if (!t || e.button > 1) return;
u = new URL(t.href); p = { props: { url: u.href } };
if ("outboundLinks" in D && /^http/.test(u.protocol) && u.host != l.host) send("Outbound Link: Click", p);
else if ("fileDownloads" in D && /\.(pdf|xlsx?|docx?|pptx?|csv|txt|zip|rar|gz|dmg|exe|msi|mp[34])$/i.test(u.pathname)) send("File Download", p)
};
on(d, "click", click);
on(d, "auxclick", click);
// The queue of calls made before the script loaded, then the real thing
// (also as `plausible`, for sites moving from Plausible).
let q = [...w.evtrack?.q || [], ...w.plausible?.q || []];
w.evtrack = w.plausible = send;
tick();
view();
for (let c of q) send(...c)
})(window, document);
