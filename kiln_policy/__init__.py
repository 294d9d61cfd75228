"""Post-synth analysis of a cloud assembly: the assembly reader, kiln's guardrail rules and their
runner, and the architecture diagram."""
