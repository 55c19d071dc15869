"""Tests of the sync worker, on real Redis, Postgres and processes."""
