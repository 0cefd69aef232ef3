"""The daqif servers: what runs (DPM, writer, simulator). Clients import `daqif`, not this."""
