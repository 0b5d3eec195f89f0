"""The webhook dispatcher: fan-out, signed delivery, delivery history, operator actions, the Letta bridge, the
management API and the ``letta-bus`` command line.

Packages by role; imports flow one way, each package importing only those below it (tests/unit/test_layering.py):

    cli -> api -> ops | bridge -> delivery -> store -> rules

``ops`` and ``bridge`` stand side by side and do not import each other. Nothing outside the dispatcher imports it.
"""
