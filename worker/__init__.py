"""tvmpipe's stage worker: a TVM RPC server that also runs pipeline stages."""
