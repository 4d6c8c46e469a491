"""The wire format: frames, requests and replies, Info's JSON — bytes only, no sockets."""
