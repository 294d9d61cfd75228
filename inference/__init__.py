"""kiln's model server: the SageMaker container contract over a continuous-batching engine."""

from inference.threads import configure_openmp

# Before anything imports torch (which loads libgomp, which reads its settings once).
configure_openmp()
