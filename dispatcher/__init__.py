"""The webhook dispatcher: fan-out, signed delivery, delivery history and the letta-bus CLI."""
