"""signalpost: a WebRTC signaling backend.

    browsers / SDKs --ws--> edge (edge/)  --ZeroMQ, msgpack envelopes-->  broker (broker/)
                              |                                           rooms, history,
                              |                                           resume replay
                              +--ZeroMQ--> presence (presence/): who is online, watchers,
                                                                 session directory
This shared package holds what every tier uses: the wire types (``wire``), settings
(``config``), tokens and TURN credentials (``auth``), the exception tree (``errors``),
room placement (``placement``), node links (``transport``), the CLI and the Python
client SDK (``client``).
"""

__version__ = "0.1.0"
