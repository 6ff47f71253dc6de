#!/usr/bin/env python3
"""Sends two months of made-up traffic of one site to a running evtrack
(`POST /events`), for the dashboard's screenshot (scripts/screenshot.sh).

Usage: demo_events.py <evtrack base URL> <site id> [visitors]
Deterministic (fixed seed) apart from the current time it ends at.
"""
import json
import random
import sys
import time
import urllib.request

base, site = sys.argv[1], sys.argv[2]
visitors = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
rng = random.Random(7)
now = int(time.time() * 1000)
DAY = 86_400_000

PAGES = ["/", "/pricing", "/blog/launch", "/docs", "/docs/install", "/blog/rust-analytics",
         "/about", "/docs/api", "/changelog", "/blog/privacy"]
SOURCES = [  # source, referrer, share
    (None, None, 40), ("Google", "google.com", 25), ("Hacker News", "news.ycombinator.com", 10),
    ("GitHub", "github.com", 8), ("DuckDuckGo", "duckduckgo.com", 6), ("Reddit", "reddit.com", 6),
    ("Bing", "bing.com", 3), ("Mastodon", "mastodon.social", 2),
]
COUNTRIES = [("US", 30), ("DE", 14), ("GB", 10), ("FR", 8), ("IN", 8), ("NL", 6), ("CA", 5),
             ("BR", 5), ("JP", 4), ("SE", 4), ("PL", 3), ("AU", 3)]
CLIENTS = [  # browser, os, device, share
    ("Chrome", "Windows", "Desktop", 28), ("Chrome", "Android", "Mobile", 18),
    ("Safari", "iOS", "Mobile", 16), ("Firefox", "Linux", "Desktop", 10),
    ("Safari", "Mac", "Desktop", 12), ("Edge", "Windows", "Desktop", 8),
    ("Firefox", "Windows", "Desktop", 5), ("Samsung Internet", "Android", "Tablet", 3),
]
CAMPAIGNS = [None] * 8 + ["launch", "newsletter"]


def pick(options):
    return rng.choices(options, weights=[o[-1] for o in options])[0]


events = []
for v in range(visitors):
    user = f"demo-{v}"
    # More traffic lately.
    for _ in range(1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)):
        day = int(60 * (rng.random() ** 1.3))
        start = now - day * DAY - rng.randrange(DAY)
        if start > now:
            continue
        source, referrer, _ = pick(SOURCES)
        browser, os_name, device, _ = pick(CLIENTS)
        ctx = {"country": pick(COUNTRIES)[0], "browser": browser, "os": os_name, "device": device}
        if source:
            ctx.update(source=source, referrer=referrer)
        campaign = rng.choice(CAMPAIGNS)
        if campaign:
            ctx.update(utm_campaign=campaign, utm_source="newsletter" if campaign == "newsletter" else "social")
        ts = start
        for _ in range(1 + min(int(rng.expovariate(0.6)), 6)):
            page = PAGES[min(int(rng.expovariate(0.45)), len(PAGES) - 1)]
            events.append({"site_id": site, "event_type": "page_view", "path": page,
                           "userid": user, "timestamp": min(ts, now), **ctx})
            if page == "/pricing" and rng.random() < 0.25:
                events.append({"site_id": site, "event_type": "Signup", "path": page, "userid": user,
                               "timestamp": min(ts + 20_000, now),
                               "props": {"plan": rng.choice(["free", "free", "pro", "team"])}})
            ts += rng.randrange(10_000, 300_000)

for i in range(0, len(events), 1000):
    request = urllib.request.Request(
        f"{base}/events", data=json.dumps(events[i:i + 1000]).encode(),
        headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request) as response:
        assert response.status == 202, response.status
print(len(events))
