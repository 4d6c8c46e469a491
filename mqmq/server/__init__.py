"""The server: the protocol on each connection, its reply writer and liveness checks, the service, twistd's options and the lean reactor."""
