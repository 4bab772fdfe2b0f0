"""selfcheckd: end-to-end mail pipeline selfchecks and a sinkhole leak watcher."""

__version__ = "0.1.0"
