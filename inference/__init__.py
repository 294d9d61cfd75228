"""kiln's model server: the SageMaker container contract over a continuous-batching engine."""
