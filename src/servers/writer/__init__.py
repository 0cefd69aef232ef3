"""The Standard DAQ compatible writer: a data path process (ZeroMQ → HDF5) and its control plane."""
