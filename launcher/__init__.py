"""Services as processes: each service built from its configuration and run until SIGTERM,
and the four started together on one machine (the demo, the federation benchmark)."""
