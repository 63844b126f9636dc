"""Presence tier: who is online (user -> sessions -> edge), watchers, the session directory.

``table`` is the sans-I/O core (``PresenceTable``); ``service`` the ZeroMQ shell.
"""
