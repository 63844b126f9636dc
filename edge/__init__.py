"""Edge tier: stateless WebSocket nodes that authenticate clients and forward their commands.

``guard`` (pure limits per connection), ``server`` (the WebSocket shell), ``backplane``
(the edge's links to owners: in-process for dev, ZeroMQ for a cluster).
"""
