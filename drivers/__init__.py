"""Device drivers: one module per device family, each parsing one documented wire protocol
into the core's typed samples. Drivers import the core's types only."""
