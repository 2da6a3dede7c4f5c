"""Links between processes on one host: the client channel and the live feed for viewers (Unix sockets)."""
