"""The sidecar: the hot path that reserves, commits and refunds tokens for chat services."""
