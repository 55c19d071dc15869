"""The sync worker: settled usage from Redis into Postgres, plans into Redis, reaper, alerts."""
