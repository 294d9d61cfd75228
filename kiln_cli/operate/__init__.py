"""The `kiln` operating commands' AWS side: status, train, deploy-model and invoke."""
