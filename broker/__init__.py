"""Broker tier: owns rooms (membership, capacity, numbered history) and routes their events.

``rooms`` is the sans-I/O core (``RoomTable``); ``service`` the ZeroMQ shell.
"""
