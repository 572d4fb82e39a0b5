"""Research workflows over training runs: sweeps and their results table, the paper's
re-routing analyses, specialization by token category, plots and reports."""
