"""kiln's platform core: the settings schema for `config/`, config loading, naming, the GPU catalog
and the contract of names that cross runtimes. It imports no boto3, CDK or torch."""
