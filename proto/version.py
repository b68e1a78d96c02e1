"""Versions that travel in pipeline packages and handshakes."""

PACKAGE_VERSION = "0.1.0"
# Bump when a header field, a message type or the meaning of one changes. 3: the data plane is
# authenticated (the start request's "security"), the handshake carries a secret's challenge.
PROTOCOL_VERSION = 3
# Bump when pipeline.json changes shape.
PACKAGE_SCHEMA_VERSION = 1
