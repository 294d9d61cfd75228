"""One module per deployable stack, and the Stage that composes one environment's stacks."""
