//! RabbitMQ transport on lapin (MassTransit topology and conventions).
