"""Links between processes: the client channel and the live feed for viewers (Unix sockets on one host,
``wire`` + ``server``), and the listen-address rules of tuner's TCP servers (``addr``).

Imports nothing: ``tuner.client`` imports ``tuner.link.wire`` inside users' inference."""
