//! The standard services every wayside gRPC server exposes: `grpc.health.v1.Health` and
//! `grpc.reflection.v1` (with every wayside service and the health service registered),
//! so grpcurl, grpc_health_probe and similar tools work against any node.

use tonic_health::server::HealthReporter;

/// A health service and its reporter. The reporter sets each service's state; the
/// empty service name ("") stands for the whole server.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// The reflection service describing every wayside service.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid")
}
