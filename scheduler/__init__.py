"""Scheduler: worker registry, heartbeats, and placement (pure core + gRPC shell)."""
