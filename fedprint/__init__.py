"""fedprint: federated ten-print identification."""
