"""The broker: the rules of queues, the Gets waiting on them and their timeouts, and the limits."""
