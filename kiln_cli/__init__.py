"""The `kiln` operator tool: the command line, the AWS operating commands, the local loop and the
training-job renderer."""
