"""The model both workloads run: its configuration, definition, tokenizer and directory format."""
