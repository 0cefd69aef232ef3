"""The live status page (`daqif web`, `daqif serve --web-port`): reads state, changes nothing."""
