"""The HTML of every page: a shell that `static/dashboard.js` fills from the page's JSON."""

from __future__ import annotations

from html import escape

POLL_MS = 1500  # how often a page asks for fresh data (a new step shows within ~2 s)


def page(title: str, api: str) -> str:
    """The HTML shell of a page whose data is served at `api`."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · qalign dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body data-api="{escape(api, quote=True)}" data-poll-ms="{POLL_MS}">
<nav id="crumbs"></nav>
<h1 id="title">{escape(title)}</h1>
<p id="subtitle"></p>
<p id="status" class="muted">loading…</p>
<main id="content"></main>
</body>
</html>
"""
