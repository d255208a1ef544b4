"""gRPC transport of the reward service: ``reward.proto``, its generated stubs, the server and ``GrpcReward``."""
