"""Generated protobuf/gRPC stubs of the daqif IDL (proto/daqif/v1). Regenerate: tools/gen_protos.py."""
