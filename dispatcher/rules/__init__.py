"""Rules about webhook endpoints that every layer applies: which URLs and addresses a webhook may target (the
SSRF policy, checked when a URL is written and again at connect time: ``ssrf``) and which events an endpoint
receives (``webhook_events`` patterns: ``matching``).

The bottom of the dispatcher: the store enforces these rules on write and the delivery engine at send time, so
they sit below both. Imports nothing from the dispatcher.
"""
