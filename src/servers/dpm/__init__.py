"""The Data Product Manager server (ESO daqDpmServer role)."""
