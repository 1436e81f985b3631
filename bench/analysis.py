"""What profiling found per row, written into the results next to the numbers (filled in as rows are analysed)."""

ROW_ANALYSIS: dict[str, str] = {}
