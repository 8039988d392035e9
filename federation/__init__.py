"""The federation coordinator: booking intake, simultaneous node search, threat policy, ICE outbox."""
