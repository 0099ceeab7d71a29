"""One module per row format: how its rows are recognised and read into a sample. The formats are listed,
with the fields each reads, in snugtune.data.format_registry."""
