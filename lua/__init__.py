"""The Lua scripts of the ledger, shipped as package data (loaded by quota_common.scripts)."""
