"""gRPC with mutual TLS between every site and the coordinator (the default deployment transport).

Flower 1.41's SuperNode speaks protobuf over HTTPS only. fedseek carries each Fleet RPC's
protobuf bytes, unchanged, over one gRPC channel with mutual TLS:

    SuperNode --HTTPS, loopback--> site proxy --gRPC + mTLS--> coordinator endpoint --HTTPS, loopback--> SuperLink

Modules: ``fleet`` (the RPC names and which headers cross), ``access`` (who may call: the
client certificate and the Flower node key must name the same registered, unrevoked site),
``endpoint`` (the coordinator's only public listener), ``site_proxy`` (loopback, at each site),
``loopback_tls`` (the site proxy's own certificate for the SuperNode), ``limits`` (sizes from the model).
"""
