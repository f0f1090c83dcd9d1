"""The ground every Brickyard component stands on, and that knows none of them: the ext_proc protos
(``api``), pod-metrics records, typed configuration, logging, credentials and the Kubernetes client."""
