"""The delivery console at ``/console`` (issue 13): server-rendered pages of the endpoints and deliveries a
principal sees, with live updates, charts and buttons that call the JSON API.

- :mod:`.routes`: the pages (read only, through the scoped queries) and the router mounted by the app;
- :mod:`.session`: signing in with a portal link (``/console/#token=lbp_...``) and out;
- :mod:`.rendering`: templates, the Content-Security-Policy, error pages;
- :mod:`.reading`: what a page shows beyond rows: an event's payload, redacted request headers, circuit states;
- :mod:`.live`: server-sent events of new attempts (``/console/stream``);
- :mod:`.charts`: inline SVG charts of :mod:`dispatcher.store.stats` series.

Every change a page offers (create, edit, rotate, test, retry, replay, resend) is made by the browser calling the
JSON API with the session cookie (``static/console.js``), so the API's scope and role checks are the only ones.
"""
