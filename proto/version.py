"""Versions that travel in pipeline packages and handshakes."""

PACKAGE_VERSION = "0.1.0"
# Bump when a header field, a message type or the meaning of one changes.
PROTOCOL_VERSION = 2
# Bump when pipeline.json changes shape.
PACKAGE_SCHEMA_VERSION = 1
