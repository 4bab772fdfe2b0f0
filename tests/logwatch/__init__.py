"""Tests of the leak watcher (daemon/logwatch)."""
