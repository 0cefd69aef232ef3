"""The detector simulator: binds a ZeroMQ source and sends frames."""
