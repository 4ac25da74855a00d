"""Storage and formats: list and read inputs, write parquet, the ledger. fsspec/pyarrow only, never torch or ray."""
