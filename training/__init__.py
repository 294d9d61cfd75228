"""kiln's training workload: a Llama-architecture language model trained on SageMaker or EKS."""
