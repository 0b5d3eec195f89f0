"""The event bus: catalog, envelope, subjects, publisher, stream provisioning and the embedded nats-server."""
