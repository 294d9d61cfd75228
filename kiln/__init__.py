"""kiln's shared core: the settings schema for `config/`, naming, guardrails and the `kiln` tool."""
